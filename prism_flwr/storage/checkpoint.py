"""Run folders, checkpoints and resume: a killed run continues from its last complete round.

Layout under ``output-dir``::

    20260101-120000-run1234-ab12cd/     one folder per run (start time, Flower run id, random suffix)
        .lock                           held (fcntl) by the ServerApp writing this folder
        checkpoint-000007.ckpt          the last KEEP checkpoints, pickle-free (prism_flwr/storage/blob.py)
        history.json, model.prism, ...
    latest -> 20260101-120000-run1234-ab12cd    the newest run that has written its first checkpoint

- every file is written to ``<name>.tmp``, fsynced and renamed over ``<name>``: a crash mid-write
  leaves the previous file intact (rename is atomic on POSIX filesystems);
- ``load_checkpoint(run_dir)`` takes the newest checkpoint that reads back whole and falls back to
  the one before, with a warning, when the newest is corrupt;
- ``RunLock`` keeps a second ServerApp (two resumes of one run) out of a folder in use;
- ``check_resume_config`` refuses to continue a checkpoint under a run config that changes the
  model or its privacy, naming the key.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_flwr.storage.blob import BlobError, pack, unpack
from prism_flwr.storage.files import write_bytes_atomic

log = logging.getLogger("prism.checkpoint")
MAGIC = b"PRISMCKP"
KEEP = 3
LATEST = "latest"
_CKPT = re.compile(r"checkpoint-(\d{6,})\.ckpt")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Run-config keys a resumed run may change: where files are, how it is watched, how long it runs
# (num-server-rounds only without DP: under DP the noise is calibrated to it). Every other key -
# dataset, ngf, nz, seed, method, aggregation, objective, dp settings, and any key added later -
# must be what the checkpoint was trained with.
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "resume-run",
        "output-dir",
        "data-dir",
        "download",
        "device",
        "round-timeout",
        "eval-every",
        "eval-samples",
        "eval-feature-metrics",
        "inception-weights",
        "fraction-evaluate",
        "min-train-nodes",
    }
)


class CheckpointError(ValueError):
    """No usable checkpoint, or one that must not be resumed."""


class RunLocked(RuntimeError):
    """Another process is writing this run folder."""


# --------------------------------------------------------------------------------- run folders
def new_run_dir(output_dir: str | Path, run_id: int | str) -> Path:
    """A fresh folder ``<time>-run<id>-<random>`` under ``output_dir``. ``latest`` is left alone:
    the run points it here (``point_latest``) once it has a checkpoint, so a run that fails before
    that never leaves ``latest`` on an empty folder."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = re.sub(r"[^0-9A-Za-z]", "", str(run_id))[:20] or "0"
    while True:
        folder = out / f"{time.strftime('%Y%m%d-%H%M%S')}-run{run}-{secrets.token_hex(3)}"
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    return folder


def point_latest(output_dir: Path, folder: Path) -> None:
    """Atomically make ``output_dir/latest`` a relative symlink to ``folder``."""
    tmp = output_dir / f".{LATEST}.{secrets.token_hex(4)}"
    os.symlink(folder.name, tmp)
    os.replace(tmp, output_dir / LATEST)


def find_run_dir(output_dir: str | Path, name: str = "") -> Path:
    """The run folder to resume: ``name`` (a folder directly under ``output_dir``) or ``latest``."""
    out = Path(output_dir)
    if name:
        if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
            raise CheckpointError(
                f"resume-run {name!r} is not a run folder name (letters, digits, '.', '_', '-')"
            )
        folder = out / name
    else:
        folder = out / LATEST
    if not folder.is_dir():
        what = f"run folder {folder}" if name else f"{folder} (no run has started in this output-dir)"
        raise CheckpointError(f"resume=true but there is no {what}")
    resolved = folder.resolve()
    if resolved.parent != out.resolve():
        raise CheckpointError(f"{folder} points outside {out}: refusing to resume from {resolved}")
    return resolved


class RunLock:
    """Exclusive ``fcntl`` lock on ``<run_dir>/.lock`` for as long as a run writes the folder.

    The kernel drops it when the process dies (even by SIGKILL), so a crashed run never leaves a
    stale lock behind.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(
                    f"{self.path.parent} is in use by another run (lock {self.path} held); "
                    "two runs must not share files"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------- checkpoints
def checkpoint_files(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every checkpoint in ``run_dir``, oldest first."""
    found = []
    for path in Path(run_dir).iterdir():
        m = _CKPT.fullmatch(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int = KEEP) -> Path:
    """Write ``checkpoint-<round>.ckpt`` (``state``: round, scores, history, run_tag, spec,
    run_config, and optionally ``aggregator``: the aggregation rule's float32 arrays) atomically,
    then delete all but the ``keep`` newest."""
    run_dir = Path(run_dir)
    scores = state["scores"]
    meta = {k: v for k, v in state.items() if k not in ("scores", "aggregator")}
    tensors = {
        "scores": np.asarray(scores, dtype=np.float32) if not isinstance(scores, torch.Tensor) else scores
    }
    tensors.update(
        {f"aggregator/{k}": np.asarray(v, dtype=np.float32) for k, v in state.get("aggregator", {}).items()}
    )
    path = run_dir / f"checkpoint-{int(state['round']):06d}.ckpt"
    write_bytes_atomic(path, pack(MAGIC, meta, tensors))
    for _, old in checkpoint_files(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """One checkpoint file -> its state (``scores`` as a float32 tensor); ``CheckpointError`` if unusable."""
    try:
        meta, tensors = unpack(Path(path).read_bytes(), MAGIC, f"checkpoint {path}")
    except BlobError as err:
        raise CheckpointError(str(err)) from None
    need = {"round", "history", "run_tag", "spec", "run_config"}
    extra = {k for k in tensors if k != "scores"}
    if (
        not isinstance(meta, dict)
        or not need <= set(meta)
        or "scores" not in tensors
        or not all(k.startswith("aggregator/") and len(k) > 11 for k in extra)
    ):
        raise CheckpointError(f"checkpoint {path} lacks {sorted(need - set(meta or {}))} or its scores")
    if type(meta["round"]) is not int or meta["round"] < 0 or not isinstance(meta["history"], list):
        raise CheckpointError(f"checkpoint {path}: bad round or history")
    scores = tensors["scores"]
    if scores.dtype != torch.float32 or scores.dim() != 1 or not torch.isfinite(scores).all():
        raise CheckpointError(f"checkpoint {path}: scores must be a finite flat float32 vector")
    aggregator = {k[len("aggregator/") :]: tensors[k].numpy() for k in extra}
    if any(
        a.dtype != np.float32 or a.shape != (scores.numel(),) or not np.isfinite(a).all()
        for a in aggregator.values()
    ):
        raise CheckpointError(
            f"checkpoint {path}: aggregator state must be finite float32 vectors like the scores"
        )
    return {**meta, "scores": scores, "aggregator": aggregator}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or the newest usable one in a run folder.

    In a folder, a newest checkpoint that does not read back (truncated, corrupted) is skipped
    with a warning for the one before it; ``CheckpointError`` when none is usable.
    """
    path = Path(path)
    if not path.is_dir():
        return read_checkpoint(path)
    files = checkpoint_files(path)
    if not files:
        raise CheckpointError(f"no checkpoint in {path}")
    errors = []
    for rnd, file in reversed(files):
        try:
            state = read_checkpoint(file)
        except CheckpointError as err:
            errors.append(str(err))
            log.warning("checkpoint %s is unusable (%s); falling back to the one before", file, err)
            continue
        if state["round"] != rnd:
            errors.append(f"{file} holds round {state['round']}")
            log.warning("checkpoint %s holds round %d; falling back to the one before", file, state["round"])
            continue
        if errors:
            log.warning("resuming from round %d: %d newer checkpoint(s) unusable", rnd, len(errors))
        return state
    raise CheckpointError(f"no usable checkpoint in {path}: " + "; ".join(errors))


def check_resume_config(
    saved: dict[str, Any],
    now: dict[str, Any],
    where: str | Path = "the checkpoint",
    defaults: dict[str, Any] | None = None,
) -> None:
    """Raise ``CheckpointError`` naming the first key that must not change on resume but did.

    ``saved`` and ``now`` are run configs as dicts with kebab-case keys; a key missing from
    ``saved`` (a checkpoint from before the key existed) counts as ``defaults[key]``.
    """
    defaults = defaults or {}
    may_change = set(RESUME_MAY_CHANGE)
    if now.get("dp", "off") == "off" and saved.get("dp", "off") == "off":
        may_change.add("num-server-rounds")
    for key in sorted(set(saved) | set(now)):
        if key in may_change:
            continue
        old = saved.get(key, defaults.get(key))
        new = now.get(key, defaults.get(key))
        if old != new:
            raise CheckpointError(
                f"resume refused: run-config key '{key}' was {old!r} in {where} and is {new!r} "
                "now; it changes the model or its privacy. Set it back, or start a new run "
                "(resume=false)"
            )
