"""Masked layers: a frozen random weight ``W`` times a learned stochastic binary mask.

``W`` is a buffer rebuilt from a seed (never trained or sent); ``scores`` are the parameters, and
``theta = sigmoid(scores)`` is the probability that a weight is kept. The forward pass uses
``W * m`` with ``m ~ Bernoulli(theta)`` (``"sample"``), ``1[theta > 0.5]`` (``"threshold"``) or no
mask (``"dense"``, the baseline); ``masked_weights`` draws all masks of a pass at once. The
gradient estimators and the rest: docs/algorithm.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MASK_MODES = ("sample", "threshold", "dense")
ESTIMATORS = ("scaled", "identity")


class _BernoulliSample(torch.autograd.Function):
    """m ~ Bernoulli(theta) with a straight-through-style backward."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, scaled: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.scaled = scaled
        if scaled:
            ctx.save_for_backward(theta)
        # u < theta with u ~ U[0, 1): the same law as torch.bernoulli, from a vectorised uniform
        # draw (bernoulli's CPU kernel draws element by element: 5x slower at ngf 16).
        return (torch.rand_like(theta) < theta).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad_m: torch.Tensor):  # type: ignore[override]
        if ctx.scaled:
            (theta,) = ctx.saved_tensors
            return grad_m * theta, None
        return grad_m, None


def signed_kaiming_constant(shape: torch.Size, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """``sign(u) * sqrt(2 / fan_in)`` with ``u`` from ``generator`` (CPU, float32)."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8) * 2 - 1
    return signs.to(torch.float32) * math.sqrt(2.0 / fan_in)


class MaskedLayer:
    """Mixin for a torch layer whose ``weight`` is frozen and multiplied by a sampled mask."""

    weight: torch.Tensor
    scores: nn.Parameter
    mask_mode: str = "sample"
    estimator: str = "scaled"

    def _make_masked(self, weight_gen: torch.Generator, score_gen: torch.Generator) -> None:
        shape = self.weight.shape
        fan_in = nn.init._calculate_correct_fan(self.weight, "fan_in")
        del self.weight  # drop the Parameter torch created; the weight is a frozen buffer
        self.register_buffer("weight", signed_kaiming_constant(shape, fan_in, weight_gen))
        self.scores = nn.Parameter(torch.randn(shape, generator=score_gen))

    @property
    def theta(self) -> torch.Tensor:
        return torch.sigmoid(self.scores)

    def mask(self) -> torch.Tensor:
        if self.mask_mode == "threshold":
            return (self.scores > 0).to(self.weight.dtype)
        return _BernoulliSample.apply(self.theta, self.estimator == "scaled")

    def masked_weight(self) -> torch.Tensor:
        if self.mask_mode == "dense":
            return self.weight
        return self.weight * self.mask()

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The layer with ``weight`` (default: this layer's own ``W * m``)."""
        return self.apply_weight(x, self.masked_weight() if weight is None else weight)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        weight_gen: torch.Generator,
        score_gen: torch.Generator,
    ) -> None:
        nn.Conv2d.__init__(self, in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self._make_masked(weight_gen, score_gen)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, None)


class MaskedConvTranspose2d(MaskedLayer, nn.ConvTranspose2d):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        weight_gen: torch.Generator,
        score_gen: torch.Generator,
    ) -> None:
        nn.ConvTranspose2d.__init__(
            self, in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False
        )
        self._make_masked(weight_gen, score_gen)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(
            x, weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )


class MaskedLinear(MaskedLayer, nn.Linear):
    def __init__(
        self, in_features: int, out_features: int, *, weight_gen: torch.Generator, score_gen: torch.Generator
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=False)
        self._make_masked(weight_gen, score_gen)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


# --- the model's masked tensors as one flat vector ---------------------------------------


def masked_layers(model: nn.Module) -> list[MaskedLayer]:
    """The masked layers of ``model`` in registration order: the order of every flat vector."""
    return [m for m in model.modules() if isinstance(m, MaskedLayer)]


def masked_weights(layers: list[MaskedLayer]) -> list[torch.Tensor]:
    """``W * m`` of every layer (all in the same mask mode), the masks drawn in one fused op.

    ``"sample"``: ``m = Bernoulli(sigmoid(cat(scores)))``, one draw over the concatenated scores,
    split back per layer (the gradient estimator of ``_BernoulliSample`` applies unchanged).
    """
    mode = layers[0].mask_mode
    if any(m.mask_mode != mode for m in layers):
        raise ValueError("masked_weights needs every layer in the same mask mode")
    if mode != "sample":
        return [m.masked_weight() for m in layers]
    flat = torch.cat([m.scores.reshape(-1) for m in layers])
    # A non-finite score must not reach the Bernoulli kernel (on CUDA its range check is a
    # device-side assert that kills the process): it samples 0 here, and training's one
    # finiteness check per round reports the NaN in the scores themselves.
    theta = torch.sigmoid(flat).nan_to_num(0.0)
    mask = _BernoulliSample.apply(theta, layers[0].estimator == "scaled")
    parts = torch.split(mask, [m.scores.numel() for m in layers])
    return [m.weight * part.view_as(m.weight) for m, part in zip(layers, parts)]


def num_masked(model: nn.Module) -> int:
    return sum(layer.scores.numel() for layer in masked_layers(model))


def layout_fingerprint(model: nn.Module) -> bytes:
    """8 bytes identifying the ordered (layer type, shape) list: masks of another model are refused."""
    desc = ";".join(f"{type(m).__name__}{tuple(m.scores.shape)}" for m in masked_layers(model))
    return hashlib.sha256(desc.encode()).digest()[:8]


def get_flat(model: nn.Module, attr: str = "scores") -> torch.Tensor:
    """All ``scores`` (or ``weight``) tensors, flattened and concatenated (detached, on the CPU)."""
    return torch.cat([getattr(m, attr).detach().flatten().cpu() for m in masked_layers(model)])


def set_flat(model: nn.Module, flat: torch.Tensor, attr: str = "scores") -> None:
    """Load a flat vector (as returned by ``get_flat``) into the model in place."""
    layers = masked_layers(model)
    expected = sum(m.scores.numel() for m in layers)
    if flat.numel() != expected:
        raise ValueError(f"vector has {flat.numel()} entries, the model has {expected} masked weights")
    offset = 0
    with torch.no_grad():
        for m in layers:
            target = getattr(m, attr)
            n = target.numel()
            target.copy_(flat[offset : offset + n].view_as(target))
            offset += n


def get_scores(model: nn.Module) -> torch.Tensor:
    return get_flat(model, "scores")


def set_scores(model: nn.Module, flat: torch.Tensor) -> None:
    set_flat(model, flat, "scores")


def make_dense(model: nn.Module) -> None:
    """Turn every masked layer into a plain trainable one (dense baseline): ``W`` becomes a
    ``Parameter``, the scores are frozen and unused. Idempotent."""
    for m in masked_layers(model):
        if not isinstance(m.weight, nn.Parameter):
            weight = m.weight
            del m.weight  # the frozen buffer
            m.weight = nn.Parameter(weight)
        m.scores.requires_grad_(False)
        m.mask_mode = "dense"


def iter_thetas(model: nn.Module) -> Iterator[torch.Tensor]:
    for m in masked_layers(model):
        yield m.theta.detach()


def sample_mask(
    model: nn.Module, thetas: list[torch.Tensor] | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One flat boolean mask ``m ~ Bernoulli(theta)`` (CPU); ``thetas`` overrides the model's (DP)."""
    thetas = thetas if thetas is not None else list(iter_thetas(model))
    return torch.cat([torch.bernoulli(t.cpu().flatten(), generator=generator) for t in thetas]).bool()


def set_mask_mode(model: nn.Module, mode: str, estimator: str | None = None) -> None:
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    for m in masked_layers(model):
        m.mask_mode = mode
        if estimator is not None:
            m.estimator = estimator
