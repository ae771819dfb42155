"""What differs between PRISM and the dense FedAvg baseline, one object per method.

A ``Method`` owns everything the rest of the code would otherwise branch on: the vector sent down,
what a client uploads, what trains, the evaluation mask mode, the exported model and the downlink
object (``broadcast.py``: with ``grid8`` and ``delta`` the server's state *is* the 8-bit grid). The
ClientApp, the ServerApp, the in-process runner and the benchmarks ask ``method_for(cfg)`` and
never test ``cfg.method`` themselves. The two side by side: docs/algorithm.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prism_flwr.config import RunConfig
from prism_flwr.federated.broadcast import DOWNLINKS, Downlink
from prism_flwr.federated.codec import encode_mask, mask_model
from prism_flwr.federated.export import load_sparse_model, save_sparse_model
from prism_flwr.federated.records import MASK_KEY, SCORES_KEY, WEIGHTS_KEY
from prism_flwr.model.masked import (
    get_flat,
    iter_thetas,
    layout_fingerprint,
    make_dense,
    sample_mask,
    set_flat,
)
from prism_flwr.model.training import TrainSettings


@dataclass(frozen=True)
class Method:
    name: str
    down_key: str  # record key of the global vector the server sends
    up_key: str  # record key of what a client sends back
    vector_attr: str  # model attribute the global vector fills ("scores" or "weight")
    eval_mask_mode: str

    def train_settings(self, cfg: RunConfig) -> TrainSettings:
        raise NotImplementedError

    def downlink(self, cfg: RunConfig) -> Downlink:
        """How the global vector goes down (default: float32)."""
        return DOWNLINKS["float32"]

    def describe(self, cfg: RunConfig) -> str:
        raise NotImplementedError

    def upload(
        self,
        model: nn.Module,
        cfg: RunConfig,
        received: np.ndarray,
        theta_release,
        mask_generator: torch.Generator,
    ) -> tuple[np.ndarray, dict]:
        """(payload array, extra metrics) a client sends after local training; ``received`` is
        the global vector as it arrived this round."""
        raise NotImplementedError

    def export(
        self, model: nn.Module, final: np.ndarray, cfg: RunConfig, out: Path
    ) -> tuple[Path, float, nn.Module]:
        """Write the final model under ``out``; returns (file, density, the model as exported)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Prism(Method):
    def train_settings(self, cfg: RunConfig) -> TrainSettings:
        return TrainSettings(
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            objective=cfg.objective,
            estimator=cfg.estimator,
            trainable="scores",
            precision=cfg.precision,
        )

    def downlink(self, cfg):
        return DOWNLINKS[cfg.downlink]

    def describe(self, cfg):
        secure = f", secure aggregation {cfg.secure_aggregation}" if cfg.secure_aggregation != "off" else ""
        return f"PRISM, {cfg.aggregation}{secure}"

    def upload(self, model, cfg, received, theta_release, mask_generator):
        """One mask ``m ~ Bernoulli(theta)`` (theta after ``theta_release``, the DP mechanism, if
        given). ``uplink-coding = "coded"``: entropy-coded against the global scores received
        this round (``codec.mask_model``, what the server derives from the scores it sent);
        ``"raw"``: bit-packed, 1 bit per weight; under secure aggregation the 0/1 mask itself."""
        thetas = [t.cpu() for t in iter_thetas(model)]
        if theta_release is not None:
            thetas = theta_release(thetas)
        mask = sample_mask(model, thetas, generator=mask_generator)
        if cfg.secure_aggregation != "off":  # masked as drawn (secure_sum), never coded or sent
            return mask.numpy().astype(np.uint8), {"mask_density": float(mask.float().mean())}
        coding = mask_model(received) if cfg.uplink_coding == "coded" else None
        blob = encode_mask(mask.numpy(), layout_fingerprint(model), coding)
        return np.frombuffer(blob, dtype=np.uint8).copy(), {"mask_density": float(mask.float().mean())}

    def export(self, model, final, cfg, out):
        """The sparse model: one mask sampled from the final theta (as the paper evaluates)."""
        set_flat(model, torch.from_numpy(final), self.vector_attr)
        mask = sample_mask(model, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
        path = out / "model.prism"
        save_sparse_model(path, model.spec, mask, {"dataset": cfg.dataset, "mask": "sample"})
        return path, float(mask.mean()), load_sparse_model(path)[0]


@dataclass(frozen=True)
class Dense(Method):
    def train_settings(self, cfg: RunConfig) -> TrainSettings:
        return TrainSettings(
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=cfg.dense_lr,
            objective=cfg.objective,
            estimator=cfg.estimator,
            trainable="weights",
            precision=cfg.precision,
        )

    def describe(self, cfg):
        return "dense FedAvg"

    def upload(self, model, cfg, received, theta_release, mask_generator):
        """The trained float32 weights: 32 bits per weight."""
        return get_flat(model, "weight").numpy(), {}

    def export(self, model, final, cfg, out):
        make_dense(model)
        set_flat(model, torch.from_numpy(final), self.vector_attr)
        path = out / "model-dense.pt"
        torch.save(torch.from_numpy(final), path)
        return path, 1.0, model.eval()


PRISM = Prism("prism", SCORES_KEY, MASK_KEY, "scores", "sample")
DENSE = Dense("dense", WEIGHTS_KEY, WEIGHTS_KEY, "weight", "dense")
METHODS = {m.name: m for m in (PRISM, DENSE)}


def method_for(cfg: RunConfig) -> Method:
    return METHODS[cfg.method]
