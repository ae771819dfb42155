"""A client's own images on disk, so that a ClientApp process starts in about a second.

Flower's deployment engine runs every message (every round's train and evaluate) in a fresh
ClientApp process. Without this cache each of them re-reads the dataset files, partitions the
labels and resizes its rows (and, for CelebA, imports torchvision): once took about 3.5 s
of a 4.5 s start-up on one CPU core (docs/benchmarks.md, "Flower's share of a round"). With it, a process
reads one small file: this client's uint8 images (memory-mapped: pages the kernel may drop and
re-read, never float copies of the whole partition) and label histogram.

The file lives in ``<data-dir>/.client-cache/`` and is named by a digest of everything that
decides its content: the dataset, the partitioning (method, partition count, seed, alpha, shards)
this partition's id, and the size and modification time of every file the dataset loader reads.
Changing any of them gives a new file. A file that cannot be read, or whose content does not
match its name (digest, dtype, shape, histogram), is refused with a warning and rebuilt from the
dataset, never used. A data directory that cannot be written only costs the speed-up.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
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
    load_labels,
    load_rows,
)
from prism_flwr.data.images import Uint8Images
from prism_flwr.data.partition import label_histogram, partition_indices
from prism_flwr.storage.files import write_bytes_atomic

log = logging.getLogger("prism.data")
CACHE_FOLDER = ".client-cache"
FORMAT = 2  # 1: a .npz read whole into memory; 2: a header, then raw pixels memory-mapped in place
MAGIC = b"PRISM-CLIENT-CACHE-2\n"
ALIGN = 4096  # the pixels start at a page boundary


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
    return cfg.resolved_data_dir() / CACHE_FOLDER / f"{cfg.dataset}-{digest}.u8"


def _encode(key: str, images: np.ndarray, hist: list[int]) -> bytearray:
    """MAGIC, a 4-byte little-endian header length, the JSON header {key, shape, hist} padded to
    ``ALIGN``, then the raw uint8 pixels: the pixels can be memory-mapped in place. One buffer,
    the pixels copied into it once."""
    header = json.dumps({"key": key, "shape": list(images.shape), "hist": [int(n) for n in hist]}).encode()
    offset = -(-(len(MAGIC) + 4 + len(header)) // ALIGN) * ALIGN
    head = MAGIC + len(header).to_bytes(4, "little") + header
    out = bytearray(head + b" " * (offset - len(head))) + bytearray(images.size)
    np.frombuffer(out, np.uint8, offset=offset).reshape(images.shape)[...] = images
    return out


def _read(path: Path, key: str, dataset: str) -> tuple[torch.Tensor, list[int]]:
    """The cached images (memory-mapped, copy-on-write) and histogram; ValueError saying why when
    the file does not match ``key``."""
    try:
        with open(path, "rb") as f:
            magic, size = f.read(len(MAGIC)), f.read(4)
            if magic != MAGIC or len(size) != 4:
                raise ValueError("not a client cache file of this version")
            header = json.loads(f.read(int.from_bytes(size, "little")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable ({err.__class__.__name__}: {err})") from None
    if not isinstance(header, dict) or set(header) != {"key", "shape", "hist"}:
        raise ValueError("its header is not key, shape and hist")
    if header["key"] != key:
        raise ValueError("written for other data or another partitioning")
    shape, hist = header["shape"], header["hist"]
    want = [NUM_CHANNELS[dataset], IMAGE_SIZE, IMAGE_SIZE]
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == want and isinstance(shape[0], int)
            and shape[0] > 0):  # fmt: skip
        raise ValueError(f"images are {shape}, not (N>0, {', '.join(map(str, want))})")
    if not (isinstance(hist, list) and len(hist) == NUM_CLASSES[dataset]
            and all(isinstance(n, int) and n >= 0 for n in hist) and sum(hist) == shape[0]):  # fmt: skip
        raise ValueError(f"label histogram {hist} does not count the {shape[0]} images")
    offset = -(-(len(MAGIC) + 4 + int.from_bytes(size, "little")) // ALIGN) * ALIGN
    if path.stat().st_size != offset + int(np.prod(shape)):
        raise ValueError(
            f"{path.stat().st_size} bytes, not the {offset + int(np.prod(shape))} its header says"
        )
    return torch.from_numpy(np.memmap(path, np.uint8, "c", offset, tuple(shape))), hist


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
    labels = load_labels(dataset, data_dir, download)
    return partition_indices(labels, num_partitions, method, seed, alpha=alpha, shards_per_partition=shards)


def _build(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, list[int]]:
    """The partition's images and histogram; a node reads only its own rows where it can (``load_rows``)."""
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
    labels = load_labels(cfg.dataset, cfg.resolved_data_dir(), cfg.download)  # read once by _partitions
    images = load_rows(cfg.dataset, cfg.resolved_data_dir(), idx, cfg.download)
    return images, label_histogram(labels, idx, NUM_CLASSES[cfg.dataset])


def _write(path: Path, key: str, images: torch.Tensor, hist: list[int]) -> bool:
    try:
        write_bytes_atomic(path, _encode(key, images.numpy(), hist))
        return True
    except OSError as err:  # e.g. a read-only data directory: slower start-ups, nothing else
        log.info("client cache not written (%s): each ClientApp process will re-read the dataset", err)
        return False


def _release_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing):
    building the cache leaves tens of MB free but resident in the process that then trains."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    if key is not None and _write(path := cache_path(cfg, key), key, images, hist):
        del images  # read back memory-mapped: pages the kernel may drop, not the process's own
        images, _ = _read(path, key, cfg.dataset)
    _release_heap()
    return images, hist


def client_data(
    cfg: RunConfig, partition_id: int, num_partitions: int, device: torch.device
) -> tuple[Uint8Images, list[int]]:
    """This client's images and label histogram, via the cache: ``Uint8Images`` on ``device``, read
    as float32 in [-1, 1] a batch at a time (indexing, ``len`` and ``device`` as a float tensor's)."""
    images, hist = client_images(cfg, partition_id, num_partitions)
    return Uint8Images(images, device), hist
