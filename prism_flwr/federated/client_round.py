"""One client's round, framework-free: global vector in, upload payload + metrics + state out.

``client_round`` is what ``client_app.py``'s ``@app.train`` runs between unpacking and packing
Flower records, and what the in-process runner (``inprocess.py``) and the benchmarks call for
every client: the same code path with or without Flower.

Per round: rebuild (or reuse) the frozen network, load the global vector, train locally
(``training.train_local``), and let the method build its upload (PRISM: one mask sampled from
theta, through the DP mechanism when ``dp = "theta"``; dense: float32 weights). Randomness is
reproducible per ``(seed, round, partition)`` for training (one stream for the Bernoulli masks of
training, one for latents and batches); what must stay hidden from the server is not: the
uploaded mask comes from a stream seeded by the client's own secret (``ClientRecord.secret``, in
every mode) and DP noise from a fresh CSPRNG seed per release (``privacy.fresh_generator``).
Under DP each release goes through the node's ledger (``LedgerSession``) when one is given.

``client_evaluate`` is the ``@app.evaluate`` side: pixel MMD^2 between samples of the global
model and the client's images, and nothing derived from data under DP.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from prism_flwr.config import RunConfig
from prism_flwr.federated.client_state import ClientRecord
from prism_flwr.federated.methods import Method, dp_theta_release
from prism_flwr.federated.seeds import derive_seed
from prism_flwr.model.build import generator_spec
from prism_flwr.model.features import build_features
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator, generate
from prism_flwr.model.masked import num_masked, set_flat, set_mask_mode
from prism_flwr.model.objectives import FeatureMatching, mmd2_unbiased
from prism_flwr.model.training import train_local
from prism_flwr.privacy import (
    ThetaAccountant,
    fresh_generator,
    noise_multiplier_for_budget,
    privatize_statistics,
    statistics_noise_multiplier,
)
from prism_flwr.privacy.ledger import LedgerError, LedgerSession

# Metrics a client may report under dp = "statistics" (training saw only the DP statistics);
# under dp = "theta" nothing computed from data leaves the client but the mask.
_DP_STATISTICS_METRICS = ("loss", "theta_density", "theta_entropy_bits", "mask_density")


@dataclass
class ClientRoundResult:
    payload: np.ndarray  # PRISM: uint8 codec bytes; dense: float32 weights
    metrics: dict[str, float | list[int]]
    record: ClientRecord  # the state to keep for the next round
    mask: np.ndarray | None = None  # under secure aggregation: the 0/1 mask drawn (uint8), masked as is


@lru_cache(maxsize=4)
def _model(spec: GeneratorSpec, method: str, device: str) -> nn.Module:
    return ResnetGenerator(spec).to(device)


def model_with(cfg: RunConfig, method: Method, vector: np.ndarray, device: torch.device) -> nn.Module:
    """The frozen network of ``cfg`` (built once per process and device) holding ``vector``.

    Everything a round changes is overwritten here (the global vector) or by ``train_local``
    (mask mode), so a cached network carries nothing from one client or round to the next.
    """
    model = _model(generator_spec(cfg), method.name, str(device))
    set_flat(model, torch.from_numpy(np.asarray(vector, dtype=np.float32)).to(device), method.vector_attr)
    return model


def received_vector(cfg: RunConfig, method: Method, array: np.ndarray, device: torch.device) -> np.ndarray:
    """The global vector from what arrived on the wire (checked against this run's format); the
    weight count comes from the network the round will train (cached per process and device)."""
    return method.downlink(cfg).decode(array, masked_count(cfg, method, device))


def masked_count(cfg: RunConfig, method: Method, device: torch.device) -> int:
    """Weights of the network the round trains (built once per process and device)."""
    return num_masked(_model(generator_spec(cfg), method.name, str(device)))


@lru_cache(maxsize=2)
def features_for(name: str, weights: str, device: str) -> nn.Module:
    return build_features(name, weights or None).to(device)


def new_record(cfg: RunConfig, secret: int | None = None) -> ClientRecord:
    """A client's state before its first round: a fresh secret from the OS (``secret`` only to
    reproduce a run, see ``privacy.insecure_test_secret``), a fresh accountant under dp = theta
    (the ClientApp replaces it by the one the node's ledger rebuilds)."""
    record = ClientRecord() if secret is None else ClientRecord(secret=int(secret))
    if cfg.dp == "theta":
        record.accountant = ThetaAccountant(theta_noise_multiplier(cfg), cfg.dp_delta, cfg.dp_epsilon)
    return record


def theta_noise_multiplier(cfg: RunConfig) -> float:
    """The noise multiplier that spends exactly the budget over ``num-server-rounds`` releases."""
    return noise_multiplier_for_budget(cfg.dp_epsilon, cfg.dp_delta, cfg.num_server_rounds)


def statistics_params(cfg: RunConfig) -> dict:
    """What decides a statistics release: the same values reuse the one in the node's ledger."""
    dump = cfg.model_dump(by_alias=True)
    return {k: dump[k] for k in ("features", "vgg19-weights", "dp-feature-clip", "dp-epsilon", "dp-delta")}


def release_multiplier(cfg: RunConfig) -> float:
    """The noise multiplier of this run's next release (what the node's ledger checks)."""
    if cfg.dp == "theta":
        return theta_noise_multiplier(cfg)
    return statistics_noise_multiplier(cfg.dp_epsilon, cfg.dp_delta)


def client_round(
    cfg: RunConfig,
    method: Method,
    vector: np.ndarray,
    data: torch.Tensor,
    hist: list[int],
    record: ClientRecord,
    *,
    partition_id: int,
    server_round: int,
    ledger: LedgerSession | None = None,
) -> ClientRoundResult:
    """Train on ``data`` from the global ``vector`` and build this client's upload.

    ``ledger``: the node's ledger for this round; each DP release is checked and recorded there
    under its lock (without one, as in the in-process runner, only the run's accountant counts)."""
    device = data.device
    if len(data) < 2:  # e.g. Dirichlet with a tiny alpha can leave a client (almost) empty
        # (no count in the text: error text reaches the server, and a partition's size is data)
        raise ValueError(f"partition {partition_id} holds fewer than 2 images: nothing to train on")
    if record.accountant is not None and not record.accountant.can_release():
        raise LedgerError(
            f"client {partition_id}: the run's privacy budget epsilon={cfg.dp_epsilon} is spent; not training"
        )
    model = model_with(cfg, method, vector, device)
    torch.manual_seed(derive_seed(cfg.seed, server_round, partition_id, 0))
    gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, server_round, partition_id, 1))
    features = features_for(cfg.features, cfg.vgg19_weights, str(device))
    if cfg.dp == "statistics" and not record.train.objective:
        # Released once with sample-level DP; every later step and round is post-processing.
        def release() -> tuple[torch.Tensor, torch.Tensor, float]:
            with torch.no_grad():
                batches = (features(data[i : i + 256]) for i in range(0, len(data), 256))
                return privatize_statistics(
                    batches,
                    cfg.dp_feature_clip,
                    cfg.dp_epsilon,
                    cfg.dp_delta,
                    generator=fresh_generator(device),
                )

        mu, var, eps = (
            release()
            if ledger is None
            else ledger.statistics(
                statistics_params(cfg), statistics_noise_multiplier(cfg.dp_epsilon, cfg.dp_delta), release
            )
        )
        record.train.objective = FeatureMatching(mu.to(device), var.to(device)).full_state()
        record.statistics_epsilon = eps

    metrics: dict = train_local(
        model, features, data, method.train_settings(cfg), record.train, generator=gen
    )
    mask_generator = torch.Generator().manual_seed(derive_seed(record.secret, server_round, partition_id, 5))
    if cfg.dp == "theta":
        z = record.accountant.noise_multiplier
        with nullcontext() if ledger is None else ledger.theta_release(z):
            payload, extra = method.upload(
                model, cfg, vector, dp_theta_release(cfg, z, fresh_generator()), mask_generator
            )
            record.accountant.step()
    else:
        payload, extra = method.upload(model, cfg, vector, None, mask_generator)
    metrics.update(extra)
    metrics.update({"num-examples": len(data), "label_histogram": [int(c) for c in hist]})
    if cfg.dp == "theta":
        metrics = {"num-examples": 1, "dp_epsilon": record.epsilon_spent}
    elif cfg.dp == "statistics":  # n and the labels are raw data
        metrics = {k: metrics[k] for k in _DP_STATISTICS_METRICS if k in metrics}
        metrics.update({"num-examples": 1, "dp_epsilon": record.epsilon_spent})
    if cfg.secure_aggregation != "off":
        return ClientRoundResult(np.zeros(0, np.uint8), metrics, record, mask=payload)
    return ClientRoundResult(payload, metrics, record)


def client_evaluate(
    cfg: RunConfig,
    method: Method,
    vector: np.ndarray,
    data: torch.Tensor,
    *,
    partition_id: int,
    server_round: int,
) -> dict[str, float]:
    """Pixel MMD^2 between samples of the global model and this client's images.

    Under DP nothing derived from the data is returned (only a constant ``num-examples``)."""
    if cfg.dp != "off":
        return {"num-examples": 1}
    model = model_with(cfg, method, vector, data.device)
    set_mask_mode(model, method.eval_mask_mode)
    seed = derive_seed(cfg.seed, server_round, partition_id, 2)
    n = min(256, len(data))
    fake = generate(model, n, seed, data.device)
    real = data[
        torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].to(data.device)
    ].cpu()
    return {"num-examples": len(data), "local_mmd_pixels": mmd2_unbiased(fake, real).item()}
