"""What the ServerApp and the ClientApps build from a ``RunConfig``: model, device, local data.

Framework-free glue shared by ``client_app.py``, ``server_app.py`` and the benchmarks. A client's
data comes through ``client_cache.py``: from one small file per client on disk, and per process
a Ray worker hosting several simulated clients loads the dataset once.
"""

from __future__ import annotations

import numpy as np
import torch

from .client_cache import client_images
from .config import RunConfig
from .data import NUM_CHANNELS, to_float
from .generator import GeneratorSpec

# Keys of the records exchanged between ServerApp and ClientApps (which method uses which:
# prism_flwr/methods.py).
SCORES_KEY = "scores"   # server -> client: ArrayRecord {"scores": 8-bit grid bytes or float32 vector}
MASK_KEY = "mask"       # client -> server: ArrayRecord {"mask": uint8 codec bytes}
WEIGHTS_KEY = "weights" # method = "dense", both ways: ArrayRecord {"weights": float32 vector}
METRICS_KEY = "metrics"


def generator_spec(cfg: RunConfig) -> GeneratorSpec:
    return GeneratorSpec(nz=cfg.nz, ngf=cfg.ngf, nc=NUM_CHANNELS[cfg.dataset], seed=cfg.seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run-config device='cuda' but no CUDA device is visible to this process")
    return torch.device(name)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, partition, ...), stable across machines."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """This client's images (float, [-1, 1], on ``device``) and its label histogram, read through
    the client cache (client_cache.py: one small file instead of the whole dataset per process)."""
    images, hist = client_images(cfg, partition_id, num_partitions)
    return to_float(images).to(device), hist
