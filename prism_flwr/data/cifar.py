"""CIFAR-10's python batches, read without torchvision, whole or only some rows.

Each batch file (``data_batch_1..5``, ``test_batch``) is a Python 2 pickle of a dict whose
``data`` is a (10000, 3072) uint8 array, each row an image's R, G then B planes (32 x 32, row
major), and ``labels`` a list of ints: ``data.reshape(-1, 3, 32, 32)`` is (N, C, H, W), the pixels
torchvision's CIFAR10 holds (as HWC). Batches are read one at a time, keeping only the rows asked
for, so a node building its partition never holds the whole split. The unpickler only builds
numpy arrays: a batch file that asks for anything else is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
# what numpy arrays pickle as (numpy 1 and numpy 2 module names)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"a CIFAR-10 batch holds no {module}.{name}")
        return super().find_class(module, name)


def _batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's images (N, 3, 32, 32) uint8 and labels int64; ``ValueError`` saying why
    when it is not a CIFAR-10 batch."""
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
        data, labels = np.asarray(entry["data"]), np.asarray(entry["labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 batch ({err.__class__.__name__}: {err})") from None
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != data.shape[:1]
    ):
        raise ValueError(
            f"{path}: data {data.dtype} {data.shape} with {labels.shape} labels, not (N, 3072) uint8"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _files(folder: Path, train: bool) -> list[Path]:
    return [folder / name for name in (TRAIN_FILES if train else TEST_FILES)]


def cifar_labels(folder: Path, train: bool) -> np.ndarray:
    """One split's labels (int64), batch after batch."""
    return np.concatenate([_batch(path)[1] for path in _files(folder, train)])


def cifar_images(folder: Path, train: bool, rows: np.ndarray | None = None) -> torch.Tensor:
    """One split's images (N, 3, 32, 32) uint8: all, or those at ``rows`` (in that order)."""
    if rows is None:
        return torch.from_numpy(np.concatenate([_batch(path)[0] for path in _files(folder, train)]))
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    wanted, parts, start = rows[order], [], 0
    for path in _files(folder, train):
        images = _batch(path)[0]
        parts.append(images[wanted[(wanted >= start) & (wanted < start + len(images))] - start])
        start += len(images)
    if len(rows) and not 0 <= wanted[0] <= wanted[-1] < start:
        raise ValueError(f"rows outside the split's {start} images")
    out = np.empty((len(rows), 3, 32, 32), np.uint8)
    out[order] = np.concatenate(parts)
    return torch.from_numpy(out)
