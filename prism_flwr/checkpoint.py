"""Atomic server checkpoints: a killed run resumes from its last complete round.

The file is written to ``<path>.tmp`` and renamed over ``<path>``: a crash mid-write leaves the
previous checkpoint intact (rename is atomic on POSIX filesystems).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


def write_text_atomic(path: str | Path, text: str) -> None:
    """For files others read while the run goes on (history.json): never seen half-written."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=False)
