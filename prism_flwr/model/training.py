"""One client's local training: global scores in, trained scores (and a sampled mask) out.

Per round the client loads the global scores, keeps its Adam moments (and, for feature matching,
its data statistics and moving-average vectors) from earlier rounds, runs ``steps`` optimisation
steps of batch ``batch_size`` on the scores only, and reports metrics. The frozen weights never
change: only ``scores`` are handed to the optimiser. With ``trainable = "weights"`` (the dense
FedAvg baseline) it is the other way round: the same network's weights train, no mask exists.

The step loop never waits for the device: losses stay in a device tensor and finiteness (of the
losses and of the trained parameters) is checked once, after the last step, before anything can be
uploaded. On CUDA the step (sampling, forward, backward, Adam) is captured once per round in a
CUDA graph after ``WARMUP_STEPS`` eager steps and replayed for the rest, which removes the
per-kernel launch cost that bounds a batch-64 step; latents, batches and masks then come from the
default generator of the data's device (not of the current device), seeded from ``generator``. A
round of at most ``WARMUP_STEPS`` steps runs them all eagerly, nothing captured. The same seed on
the same device gives the same result (cuDNN is asked for deterministic algorithms inside the
loop). The generator's forward runs in ``settings.precision`` (bf16 autocast where the CPU has
native bf16, ``model/precision.py``); features, loss, scores and Adam state stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prism_flwr.model.masked import make_dense, masked_layers, set_mask_mode
from prism_flwr.model.objectives import OBJECTIVES, FeatureMatching, mmd2_unbiased
from prism_flwr.model.precision import PRECISIONS, generator_autocast
from prism_flwr.storage.optim_state import load_optimizer_tensors, optimizer_tensors


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
    precision: str = "float32"  # the generator's compute precision (model/precision.py)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.trainable not in ("scores", "weights"):
            raise ValueError(f"trainable must be 'scores' or 'weights', got {self.trainable!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class ClientState:
    """What a client keeps between rounds (all CPU tensors, so it fits in ``context.state``)."""

    score_opt: dict[str, torch.Tensor] = field(default_factory=dict)
    objective: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def real_feature_moments(
    features: nn.Module, data: torch.Tensor, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``features`` over all of ``data``, in batches (exact, two passes free)."""
    total, total_sq, n = None, None, 0
    for i in range(0, len(data), batch):
        f = features(data[i : i + batch]).double()
        total = f.sum(0) if total is None else total + f.sum(0)
        total_sq = f.pow(2).sum(0) if total_sq is None else total_sq + f.pow(2).sum(0)
        n += f.shape[0]
    mu = total / n
    return mu.float(), (total_sq / n - mu.pow(2)).clamp_min(0).float()


WARMUP_STEPS = 3  # eager steps (on a side stream) before a CUDA graph is captured


def graph_plan(steps: int, warmup: int = WARMUP_STEPS) -> tuple[int, int]:
    """``(eager steps, graph replays)`` for a graphed round of ``steps``: up to ``warmup`` eager
    steps, then one captured step replayed for the rest (none captured when nothing is left)."""
    eager = min(max(steps, 0), warmup)
    return eager, max(steps, 0) - eager


def device_generator(device: torch.device) -> torch.Generator:
    """The default generator that random ops on ``device`` draw from when given none."""
    if device.type != "cuda":
        return torch.default_generator
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def train_local(
    model: nn.Module,
    features: nn.Module,
    data: torch.Tensor,
    settings: TrainSettings,
    state: ClientState,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
) -> dict[str, float]:
    """Train ``model``'s scores in place on ``data`` (float, [-1, 1], on the model's device).

    ``state`` is read and updated in place. ``generator`` (on the data's device) drives latent
    and batch sampling; the Bernoulli masks use torch's global RNG (seed it for reproducibility).
    ``cuda_graph``: capture the step in a CUDA graph (default: on CUDA when there are more than
    ``WARMUP_STEPS`` steps); then all randomness comes from the device's default generator,
    seeded from ``generator``.
    """
    device = data.device
    if settings.trainable == "weights":
        make_dense(model)
    else:
        set_mask_mode(model, "sample", settings.estimator)
    model.train()
    on_cuda = device.type == "cuda"
    graph = (on_cuda and settings.steps > WARMUP_STEPS) if cuda_graph is None else cuda_graph
    if graph and not on_cuda:
        raise ValueError("cuda_graph=True needs data on a CUDA device")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(
        params, lr=settings.lr, betas=settings.betas, capturable=on_cuda, fused=on_cuda or None
    )
    if state.score_opt:
        load_optimizer_tensors(opt, state.score_opt)

    fm = None
    if settings.objective == "feature-matching":
        if not state.objective:
            mu, var = real_feature_moments(features, data)
            state.objective = FeatureMatching(mu, var).full_state()
        fm = FeatureMatching.from_state(state.objective, device=device)

    def step(gen: torch.Generator | None) -> torch.Tensor:
        z = torch.randn(settings.batch_size, model.spec.nz, generator=gen, device=device)
        with generator_autocast(settings.precision, device):
            fake = model(z)
        fake_feats = features(fake.float())  # features and loss in float32
        if fm is not None:
            loss = fm(fake_feats)
        else:
            idx = torch.randint(len(data), (settings.batch_size,), generator=gen, device=device)
            with torch.no_grad():
                real_feats = features(data[idx])
            loss = mmd2_unbiased(fake_feats, real_feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    losses = torch.zeros(settings.steps, device=device)
    with torch.backends.cudnn.flags(
        enabled=True, deterministic=True, benchmark=False, allow_tf32=torch.backends.cudnn.allow_tf32
    ):
        if graph:
            _run_graphed(step, losses, device, generator)
        else:
            for i in range(settings.steps):
                losses[i] = step(generator)

    finite = torch.isfinite(losses).all()
    for p in params:
        finite &= torch.isfinite(p).all()
    if not bool(finite):  # the one host synchronisation of the round
        raise NonFiniteError("local training produced a non-finite loss or parameter; nothing is uploaded")
    state.score_opt = optimizer_tensors(opt)
    if fm is not None:
        state.objective = fm.full_state()
    tail = losses[-max(1, settings.steps // 4) :]  # the last quarter: the loss the round ended at
    stats = theta_stats(model) if settings.trainable == "scores" else {}
    return {"loss": float(tail.mean()), **stats}


def _run_graphed(step, losses: torch.Tensor, device: torch.device, generator: torch.Generator | None) -> None:
    """Eager warm-up steps on a side stream, then one step captured and replayed (``graph_plan``)."""
    if generator is not None:
        device_generator(device).manual_seed(generator.initial_seed())
    eager, replays = graph_plan(len(losses))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(eager):
            losses[i] = step(None)
    torch.cuda.current_stream(device).wait_stream(side)
    if not replays:
        return
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(None)
    for i in range(eager, eager + replays):
        graph.replay()
        losses[i].copy_(static_loss)


@torch.no_grad()
def theta_stats(model: nn.Module) -> dict[str, float]:
    """Mean keep-probability and mean binary entropy (bits) of theta over all masked weights."""
    t = torch.cat([m.theta.flatten() for m in masked_layers(model)]).double().clamp(1e-12, 1 - 1e-12)
    ent = -(t * t.log2() + (1 - t) * (1 - t).log2())
    return {"theta_density": float(t.mean()), "theta_entropy_bits": float(ent.mean())}
