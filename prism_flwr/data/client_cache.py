"""A client's own images on disk, so that a ClientApp process starts in about a second.

Flower's deployment engine runs every message (every round's train and evaluate) in a fresh
ClientApp process. Without this cache each of them re-reads the whole dataset, partitions it
(flwr-datasets, pandas and pyarrow imported for that alone) and imports torchvision: about 3.5 s
of a 4.5 s start-up on one CPU core (docs/benchmarks.md, "Flower's share of a round"). With it, a process
reads one small file: this client's uint8 images and label histogram.

The file lives in ``<data-dir>/.client-cache/`` and is named by a digest of everything that
decides its content: the dataset, the partitioning (method, partition count, seed, alpha, shards)
this partition's id, and the size and modification time of every file the dataset loader reads.
Changing any of them gives a new file. A file that cannot be read, or whose content does not
match its name (digest, dtype, shape, histogram), is refused with a warning and rebuilt from the
dataset, never used. A data directory that cannot be written only costs the speed-up.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from prism_flwr.config import RunConfig
from prism_flwr.data.datasets import (
    IMAGE_SIZE,
    NUM_CHANNELS,
    NUM_CLASSES,
    expected_files,
    load_dataset,
    to_float,
)
from prism_flwr.data.partition import label_histogram, partition_indices
from prism_flwr.storage.files import write_bytes_atomic

log = logging.getLogger("prism.data")
CACHE_FOLDER = ".client-cache"
FORMAT = 1


def _key(cfg: RunConfig, partition_id: int, num_partitions: int) -> str | None:
    """What decides the cached content, as canonical JSON; None while the dataset's files are missing."""
    root = cfg.resolved_data_dir()
    files = expected_files(cfg.dataset, root)
    if not all(path.exists() for path in files):
        return None
    stats = [
        [str(path.relative_to(root)), st.st_size, st.st_mtime_ns] for path in files for st in [path.stat()]
    ]
    return json.dumps(
        {
            "format": FORMAT,
            "dataset": cfg.dataset,
            "partitioning": cfg.partitioning,
            "num-partitions": num_partitions,
            "partition-id": partition_id,
            "seed": cfg.seed,
            "dirichlet-alpha": cfg.dirichlet_alpha,
            "shards": cfg.shards_per_partition,
            "files": stats,
        },
        sort_keys=True,
    )


def cache_path(cfg: RunConfig, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cfg.resolved_data_dir() / CACHE_FOLDER / f"{cfg.dataset}-{digest}.npz"


def _read(path: Path, key: str, dataset: str) -> tuple[torch.Tensor, list[int]]:
    """The cached images and histogram; ValueError saying why when the file does not match ``key``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"unreadable ({err.__class__.__name__}: {err})") from None
    if set(arrays) != {"key", "images", "hist"}:
        raise ValueError(f"holds {sorted(arrays)}, not key, images and hist")
    if arrays["key"].dtype != np.uint8 or arrays["key"].tobytes() != key.encode():
        raise ValueError("written for other data or another partitioning")
    images, hist = arrays["images"], arrays["hist"]
    shape = (NUM_CHANNELS[dataset], IMAGE_SIZE, IMAGE_SIZE)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape or len(images) == 0:
        raise ValueError(
            f"images are {images.dtype} {images.shape}, not uint8 (N>0, {', '.join(map(str, shape))})"
        )
    if (
        hist.dtype != np.int64
        or hist.shape != (NUM_CLASSES[dataset],)
        or (hist < 0).any()
        or int(hist.sum()) != len(images)
    ):
        raise ValueError(f"label histogram {hist.tolist()} does not count the {len(images)} images")
    return torch.from_numpy(images), [int(n) for n in hist]


@lru_cache(maxsize=4)  # a process hosting several clients (in-process runner, Ray) partitions once
def _partitions(
    dataset: str,
    data_dir: str,
    download: bool | str,
    num_partitions: int,
    method: str,
    seed: int,
    alpha: float,
    shards: int,
) -> list[np.ndarray]:
    labels = load_dataset(dataset, data_dir, train=True, download=download).labels
    return partition_indices(labels, num_partitions, method, seed, alpha=alpha, shards_per_partition=shards)


def _build(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, list[int]]:
    data = load_dataset(cfg.dataset, cfg.resolved_data_dir(), train=True, download=cfg.download)
    idx = _partitions(
        cfg.dataset,
        str(cfg.resolved_data_dir()),
        cfg.download,
        num_partitions,
        cfg.partitioning,
        cfg.seed,
        cfg.dirichlet_alpha,
        cfg.shards_per_partition,
    )[partition_id]
    return data.images[torch.as_tensor(idx, dtype=torch.long)], label_histogram(
        data.labels, idx, data.num_classes
    )


def _write(path: Path, key: str, images: torch.Tensor, hist: list[int]) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        key=np.frombuffer(key.encode(), dtype=np.uint8),
        images=images.numpy(),
        hist=np.asarray(hist, dtype=np.int64),
    )
    try:
        write_bytes_atomic(path, buf.getvalue())
    except OSError as err:  # e.g. a read-only data directory: slower start-ups, nothing else
        log.info("client cache not written (%s): each ClientApp process will re-read the dataset", err)


def client_images(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, list[int]]:
    """This client's uint8 images (N, C, 32, 32) and label histogram, from the cache when it
    holds them, else from the dataset (then cached)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    key = _key(cfg, partition_id, num_partitions)
    if key is not None and (path := cache_path(cfg, key)).is_file():
        try:
            return _read(path, key, cfg.dataset)
        except ValueError as why:
            log.warning("client cache %s refused (%s); rebuilding it from the dataset", path, why)
    images, hist = _build(cfg, partition_id, num_partitions)
    key = key or _key(cfg, partition_id, num_partitions)  # the files exist now (prepared or downloaded)
    if key is not None:
        _write(cache_path(cfg, key), key, images, hist)
    return images, hist


def client_data(
    cfg: RunConfig, partition_id: int, num_partitions: int, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """This client's images (float, [-1, 1], on ``device``) and its label histogram, via the cache."""
    images, hist = client_images(cfg, partition_id, num_partitions)
    return to_float(images).to(device), hist
