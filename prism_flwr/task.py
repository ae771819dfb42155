"""What the ServerApp and the ClientApps build from a ``RunConfig``: model, device, local data.

Framework-free glue shared by ``client_app.py``, ``server_app.py`` and the benchmarks. Data and
partitions are cached per process: a Ray worker that hosts several simulated clients loads the
dataset once.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .config import RunConfig
from .data import NUM_CHANNELS, load_dataset
from .generator import GeneratorSpec
from .partition import label_histogram, partition_indices

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


@lru_cache(maxsize=4)
def _partitions(dataset: str, data_dir: str, download: bool, num_partitions: int, method: str,
                seed: int, alpha: float, shards: int) -> list[np.ndarray]:
    labels = load_dataset(dataset, data_dir, train=True, download=download).labels
    return partition_indices(labels, num_partitions, method, seed, alpha=alpha, shards_per_partition=shards)


def client_indices(cfg: RunConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    return _partitions(cfg.dataset, str(cfg.resolved_data_dir()), cfg.download, num_partitions,
                       cfg.partitioning, cfg.seed, cfg.dirichlet_alpha, cfg.shards_per_partition)[partition_id]


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """This client's images (float, [-1, 1], on ``device``) and its label histogram."""
    data = load_dataset(cfg.dataset, cfg.resolved_data_dir(), train=True, download=cfg.download)
    idx = client_indices(cfg, partition_id, num_partitions)
    return data.to_float(idx).to(device), label_histogram(data.labels, idx, data.num_classes)
