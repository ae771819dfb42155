"""What the ServerApp and the ClientApps build from a ``RunConfig``: the generator's spec, the device."""

from __future__ import annotations

import torch

from prism_flwr.config import RunConfig
from prism_flwr.data.datasets import NUM_CHANNELS
from prism_flwr.model.generator import GeneratorSpec


def generator_spec(cfg: RunConfig) -> GeneratorSpec:
    """The frozen network every party rebuilds: width, latent size, channels and seed."""
    return GeneratorSpec(nz=cfg.nz, ngf=cfg.ngf, nc=NUM_CHANNELS[cfg.dataset], seed=cfg.seed)


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when visible), ``cpu`` or ``cuda`` (an error when no GPU is visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run-config device='cuda' but no CUDA device is visible to this process")
    return torch.device(name)
