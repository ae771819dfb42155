"""One client's local training: global scores in, trained scores (and a sampled mask) out.

Per round the client loads the global scores, keeps its Adam moments (and, for feature matching,
its data statistics and moving-average vectors) from earlier rounds, runs ``steps`` optimisation
steps of batch ``batch_size`` on the scores only, and reports metrics. The frozen weights never
change: only ``scores`` are handed to the optimiser. With ``trainable = "weights"`` (the dense
FedAvg baseline) it is the other way round: the same network's weights train, no mask exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .masked import make_dense, masked_layers, set_mask_mode
from .objectives import OBJECTIVES, FeatureMatching, mmd2_unbiased
from .optim_state import load_optimizer_tensors, optimizer_tensors


class NonFiniteError(RuntimeError):
    """Raised when the loss or the scores stop being finite: nothing is uploaded then."""


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    batch_size: int = 64
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.999)
    objective: str = "feature-matching"
    estimator: str = "scaled"
    trainable: str = "scores"  # or "weights": the dense baseline

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.trainable not in ("scores", "weights"):
            raise ValueError(f"trainable must be 'scores' or 'weights', got {self.trainable!r}")


@dataclass
class ClientState:
    """What a client keeps between rounds (all CPU tensors, so it fits in ``context.state``)."""

    score_opt: dict[str, torch.Tensor] = field(default_factory=dict)
    objective: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def real_feature_moments(features: nn.Module, data: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``features`` over all of ``data``, in batches (exact, two passes free)."""
    total, total_sq, n = None, None, 0
    for i in range(0, len(data), batch):
        f = features(data[i:i + batch]).double()
        total = f.sum(0) if total is None else total + f.sum(0)
        total_sq = f.pow(2).sum(0) if total_sq is None else total_sq + f.pow(2).sum(0)
        n += f.shape[0]
    mu = total / n
    return mu.float(), (total_sq / n - mu.pow(2)).clamp_min(0).float()


def train_local(model: nn.Module, features: nn.Module, data: torch.Tensor, settings: TrainSettings,
                 state: ClientState, generator: torch.Generator | None = None) -> dict[str, float]:
    """Train ``model``'s scores in place on ``data`` (float, [-1, 1], on the model's device).

    ``state`` is read and updated in place. ``generator`` (on the data's device) drives latent
    and batch sampling; the Bernoulli masks use torch's global RNG (seed it for reproducibility).
    """
    device = data.device
    if settings.trainable == "weights":
        make_dense(model)
    else:
        set_mask_mode(model, "sample", settings.estimator)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.lr, betas=settings.betas)
    if state.score_opt:
        load_optimizer_tensors(opt, state.score_opt)

    fm = None
    if settings.objective == "feature-matching":
        if not state.objective:
            mu, var = real_feature_moments(features, data)
            state.objective = FeatureMatching(mu, var).full_state()
        fm = FeatureMatching.from_state(state.objective, device=device)

    losses = []
    for _ in range(settings.steps):
        z = torch.randn(settings.batch_size, model.spec.nz, generator=generator, device=device)
        fake_feats = features(model(z))
        if fm is not None:
            loss = fm(fake_feats)
        else:
            idx = torch.randint(len(data), (settings.batch_size,), generator=generator, device=device)
            with torch.no_grad():
                real_feats = features(data[idx])
            loss = mmd2_unbiased(fake_feats, real_feats)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"local loss became {loss.item()} at step {len(losses)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    if not all(torch.isfinite(p).all() for p in params):
        raise NonFiniteError("scores became non-finite during local training")
    state.score_opt = optimizer_tensors(opt)
    if fm is not None:
        state.objective = fm.full_state()
    tail = losses[-max(1, len(losses) // 4):]  # the last quarter: the loss the round ended at
    stats = theta_stats(model) if settings.trainable == "scores" else {}
    return {"loss": float(sum(tail) / len(tail)), **stats}


@torch.no_grad()
def theta_stats(model: nn.Module) -> dict[str, float]:
    """Mean keep-probability and mean binary entropy (bits) of theta over all masked weights."""
    n, dens, ent = 0, 0.0, 0.0
    for m in masked_layers(model):
        t = m.theta.double().clamp(1e-12, 1 - 1e-12)
        dens += t.sum().item()
        ent += (-(t * t.log2() + (1 - t) * (1 - t).log2())).sum().item()
        n += t.numel()
    return {"theta_density": dens / n, "theta_entropy_bits": ent / n}

