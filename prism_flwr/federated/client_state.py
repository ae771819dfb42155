"""What a client carries from one round to the next, kept on the node.

``ClientRecord`` (optimiser and objective state, the privacy mode it was kept under, the round's
answer, and the secret that seeds the client's uploaded masks, drawn from the OS's CSPRNG and never
sent) is one pickle-free
blob kept in Flower's ``context.state`` and on disk per round under the node's ``state-dir`` (never
a server-chosen path), so a resumed server gets clients in their state after that round. The
privacy ledger is node-wide: ``prism_flwr/privacy/ledger.py``. Details: docs/security.md (Files),
docs/privacy.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prism_flwr.model.training import ClientState
from prism_flwr.privacy.randomness import new_secret
from prism_flwr.storage.blob import BlobError, pack, unpack
from prism_flwr.storage.files import write_bytes_atomic

MAGIC = b"PRISMCST"
KEEP_STATES = 4
STATE_MODE = 0o600
_RUN_TAG = re.compile(r"[0-9a-f]{8,64}")
_STATE_FILE = re.compile(r"round-(\d{1,9})\.state")


class StateError(ValueError):
    """A client-state blob or file that must not be used."""


def validate_run_tag(tag: object) -> str:
    """The server's run tag if it is 8-64 lowercase hex characters; ``ValueError`` otherwise."""
    if not isinstance(tag, str) or not _RUN_TAG.fullmatch(tag):
        raise ValueError(f"run-tag {str(tag)[:80]!r} is not 8-64 lowercase hex characters")
    return tag


def client_state_dir(state_dir: str | Path, run_tag: object) -> Path:
    """``<state_dir>/runs/<run_tag>`` for a validated ``run_tag`` (``state_dir``: the node's)."""
    return Path(state_dir) / "runs" / validate_run_tag(run_tag)


def _check_partition(partition_id: object) -> int:
    if type(partition_id) is not int or not 0 <= partition_id < 2**31:
        raise ValueError(f"partition id {partition_id!r} is not a non-negative integer")
    return partition_id


@dataclass
class ClientRecord:
    """One client's state after a round: training state, mask secret, the privacy mode it was kept
    under (``mode``, never reused under another) and the round's answer as sent (``answer`` and
    ``answer_metrics``; empty under secure aggregation), replayed if the same round is asked again."""

    train: ClientState = field(default_factory=ClientState)
    secret: int = field(default_factory=new_secret)
    mode: str = ""
    answer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    answer_metrics: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        tensors = {f"score_opt/{k}": v for k, v in self.train.score_opt.items()}
        tensors.update({f"objective/{k}": v for k, v in self.train.objective.items()})
        tensors["answer/payload"] = np.asarray(self.answer)
        meta = {"secret": int(self.secret), "mode": self.mode, "answer_metrics": self.answer_metrics}
        return pack(MAGIC, meta, tensors)

    @classmethod
    def from_bytes(cls, blob: bytes) -> ClientRecord:
        try:
            meta, tensors = unpack(blob, MAGIC, "client state")
        except BlobError as err:
            raise StateError(str(err)) from None
        if not isinstance(meta, dict) or set(meta) != {"secret", "mode", "answer_metrics"}:
            raise StateError("client state: unexpected fields")
        secret, mode, metrics = meta["secret"], meta["mode"], meta["answer_metrics"]
        if type(secret) is not int or not isinstance(mode, str) or not isinstance(metrics, dict):
            raise StateError("client state: bad secret, mode or answer metrics")
        groups: dict[str, dict[str, torch.Tensor]] = {"score_opt": {}, "objective": {}, "answer": {}}
        for name, tensor in tensors.items():
            group, _, key = name.partition("/")
            if group not in groups or not key:
                raise StateError(f"client state: unexpected tensor {name!r}")
            groups[group][key] = tensor
        payload = groups["answer"].get("payload")
        if payload is None or payload.dim() != 1:
            raise StateError("client state: no answer payload")
        train = ClientState(groups["score_opt"], groups["objective"])
        return cls(train, secret, mode, payload.numpy(), metrics)


def _saved_rounds(state_dir: Path, partition_id: int) -> dict[int, Path]:
    folder = Path(state_dir) / f"partition-{_check_partition(partition_id)}"
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := _STATE_FILE.fullmatch(p.name))}


def write_state_file(state_dir: Path, partition_id: int, server_round: int, blob: bytes) -> None:
    """Atomically write this round's state (0600, fsynced); keep the ``KEEP_STATES`` newest rounds."""
    folder = Path(state_dir) / f"partition-{_check_partition(partition_id)}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_bytes_atomic(folder / f"round-{int(server_round)}.state", blob, STATE_MODE)
    for _, old in sorted(_saved_rounds(state_dir, partition_id).items())[:-KEEP_STATES]:
        old.unlink(missing_ok=True)


def read_latest_state_file(state_dir: Path, partition_id: int, before_round: int) -> tuple[int, bytes] | None:
    """The newest saved ``(round, blob)`` from a round before ``before_round``, if any."""
    earlier = {r: p for r, p in _saved_rounds(state_dir, partition_id).items() if r < before_round}
    if not earlier:
        return None
    latest = max(earlier)
    return latest, earlier[latest].read_bytes()


def answered_rounds(state_dir: Path, partition_id: int) -> dict[int, Path]:
    """The rounds this client has answered in the run whose folder is ``state_dir`` (kept ones)."""
    return _saved_rounds(state_dir, partition_id)
