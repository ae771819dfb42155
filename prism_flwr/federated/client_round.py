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
What is released and reported is the privacy mode's (``privacy.modes``), through the node's ledger.

``client_evaluate`` is the ``@app.evaluate`` side: pixel MMD^2 between samples of the global
model and the client's images, and nothing derived from data under DP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from prism_flwr.config import RunConfig
from prism_flwr.federated.client_state import ClientRecord
from prism_flwr.federated.methods import Method
from prism_flwr.federated.seeds import derive_seed
from prism_flwr.model.build import generator_spec
from prism_flwr.model.features import build_features
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator, generate
from prism_flwr.model.masked import num_masked, set_flat, set_mask_mode
from prism_flwr.model.objectives import mmd2_unbiased
from prism_flwr.model.training import train_local
from prism_flwr.privacy.ledger import LedgerSession
from prism_flwr.privacy.modes import PrivacyModeError, privacy_for

log = logging.getLogger("prism.client")
# What the server hears when the node's VGG19 cannot be loaded: nothing about the node's files.
VGG19_UNAVAILABLE = "features='vgg19': the node's configured vgg19-weights is missing or unreadable"


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
    """The feature network; ``weights``: the node's own ``vgg19-weights`` (node config, never the run's).

    A VGG19 that cannot be loaded is one line for the server, the same whatever the node's files are
    (torch's own errors quote the file's bytes); the details go to the node's log."""
    try:
        return build_features(name, weights or None).to(device)
    except Exception:
        if name != "vgg19":
            raise
        log.exception("features='vgg19': loading the weights failed")
        raise FileNotFoundError(VGG19_UNAVAILABLE) from None


def new_record(cfg: RunConfig, secret: int | None = None) -> ClientRecord:
    """A client's state before its first round: a fresh secret from the OS (``secret`` only to
    reproduce a run, see ``privacy.insecure_test_secret``)."""
    return ClientRecord() if secret is None else ClientRecord(secret=int(secret))


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
    vgg19_weights: str = "",
) -> ClientRoundResult:
    """Train on ``data`` from the global ``vector`` and build this client's upload.

    What leaves and how it is accounted is the run's privacy mode's (``privacy.modes``): under DP
    every release is checked and recorded in the node's ledger ``ledger`` (required then), before
    any training for the check. A ``record`` kept under another privacy mode is refused.
    ``vgg19_weights``: the node's weights file (node config); empty: the torch hub cache."""
    privacy = privacy_for(cfg, vgg19_weights)
    if record.mode and record.mode != privacy.binding():
        raise PrivacyModeError(
            f"this run's client state was kept under {record.mode}; the server now asks for "
            f"{privacy.binding()}: a run's privacy mode and objective cannot change"
        )
    if privacy.spends and ledger is None:
        raise ValueError(f"dp={privacy.name!r}: a client round needs the node's privacy ledger")
    device = data.device
    if len(data) < 2:  # e.g. Dirichlet with a tiny alpha can leave a client (almost) empty
        # (no count in the text: error text reaches the server, and a partition's size is data)
        raise ValueError(f"partition {partition_id} holds fewer than 2 images: nothing to train on")
    privacy.precheck(ledger)
    model = model_with(cfg, method, vector, device)
    torch.manual_seed(derive_seed(cfg.seed, server_round, partition_id, 0))
    gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, server_round, partition_id, 1))
    features = features_for(cfg.features, vgg19_weights, str(device))
    privacy.prepare(record.train, features, data, ledger)
    metrics: dict = train_local(
        model, features, data, method.train_settings(cfg), record.train, generator=gen
    )
    mask_generator = torch.Generator().manual_seed(derive_seed(record.secret, server_round, partition_id, 5))
    payload, extra = privacy.release(
        ledger, lambda theta_release: method.upload(model, cfg, vector, theta_release, mask_generator)
    )
    metrics.update(extra)
    record.mode = privacy.binding()
    metrics = privacy.report(metrics, len(data), hist, ledger)
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
    privacy = privacy_for(cfg)
    if privacy.spends:
        return privacy.evaluation_report({})
    model = model_with(cfg, method, vector, data.device)
    set_mask_mode(model, method.eval_mask_mode)
    seed = derive_seed(cfg.seed, server_round, partition_id, 2)
    n = min(256, len(data))
    fake = generate(model, n, seed, data.device)
    real = data[
        torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].to(data.device)
    ].cpu()
    return {"num-examples": len(data), "local_mmd_pixels": mmd2_unbiased(fake, real).item()}
