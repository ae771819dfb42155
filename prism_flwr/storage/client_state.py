"""What a client carries from one round to the next, and the ledger of what it has released.

``ClientRecord`` (optimiser and objective state, privacy accountant, a secret that seeds the
client's own random streams under DP and never leaves it) is one pickle-free blob kept in Flower's
``context.state`` and on disk per round, so a resumed server gets clients in their state after
that round. ``PrivacyLedger`` is append-only and rebuilds the accountant from its lines: a lost or
rolled-back state file never yields a fresh privacy budget. Details: docs/security.md (Files).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prism_flwr.storage.blob import BlobError, pack, unpack
from prism_flwr.storage.checkpoint import fsync_dir, write_bytes_atomic
from prism_flwr.privacy import ThetaAccountant
from prism_flwr.model.training import ClientState

MAGIC = b"PRISMCST"
KEEP_STATES = 4
STATE_MODE = 0o600
_RUN_TAG = re.compile(r"[0-9a-f]{8,64}")
_STATE_FILE = re.compile(r"round-(\d{1,9})\.state")


class StateError(ValueError):
    """A client-state blob or file that must not be used."""


class LedgerError(RuntimeError):
    """The privacy ledger refuses: a repeated round, another partition, or a damaged ledger."""


def validate_run_tag(tag: object) -> str:
    """The server's run tag if it is 8-64 lowercase hex characters; ``ValueError`` otherwise."""
    if not isinstance(tag, str) or not _RUN_TAG.fullmatch(tag):
        raise ValueError(f"run-tag {str(tag)[:80]!r} is not 8-64 lowercase hex characters")
    return tag


def client_state_dir(output_dir: str | Path, run_tag: object) -> Path:
    """``<output_dir>/client-state/<run_tag>`` for a validated ``run_tag``."""
    return Path(output_dir) / "client-state" / validate_run_tag(run_tag)


def _check_partition(partition_id: object) -> int:
    if type(partition_id) is not int or not 0 <= partition_id < 2**31:
        raise ValueError(f"partition id {partition_id!r} is not a non-negative integer")
    return partition_id


@dataclass
class ClientRecord:
    train: ClientState = field(default_factory=ClientState)
    accountant: ThetaAccountant | None = None
    statistics_epsilon: float = 0.0  # dp="statistics": spent once, when the statistics were released
    secret: int = field(default_factory=lambda: secrets.randbits(63))

    @property
    def epsilon_spent(self) -> float:
        return self.accountant.epsilon if self.accountant is not None else self.statistics_epsilon

    def to_bytes(self) -> bytes:
        tensors = {f"score_opt/{k}": v for k, v in self.train.score_opt.items()}
        tensors.update({f"objective/{k}": v for k, v in self.train.objective.items()})
        meta = {"accountant": self.accountant.state_dict() if self.accountant is not None else None,
                "statistics_epsilon": float(self.statistics_epsilon), "secret": int(self.secret)}
        return pack(MAGIC, meta, tensors)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "ClientRecord":
        try:
            meta, tensors = unpack(blob, MAGIC, "client state")
        except BlobError as err:
            raise StateError(str(err)) from None
        if not isinstance(meta, dict) or set(meta) != {"accountant", "statistics_epsilon", "secret"}:
            raise StateError("client state: unexpected fields")
        eps, secret = meta["statistics_epsilon"], meta["secret"]
        if not isinstance(eps, (int, float)) or not 0 <= eps < float("inf") or type(secret) is not int:
            raise StateError("client state: bad statistics_epsilon or secret")
        groups: dict[str, dict[str, torch.Tensor]] = {"score_opt": {}, "objective": {}}
        for name, tensor in tensors.items():
            group, _, key = name.partition("/")
            if group not in groups or not key:
                raise StateError(f"client state: unexpected tensor {name!r}")
            groups[group][key] = tensor
        try:
            acc = ThetaAccountant.from_state(meta["accountant"]) if meta["accountant"] is not None else None
        except (KeyError, TypeError, ValueError) as err:
            raise StateError(f"client state: bad accountant: {err}") from None
        return cls(ClientState(groups["score_opt"], groups["objective"]), acc, float(eps), secret)


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


# ----------------------------------------------------------------------------- privacy ledger
class PrivacyLedger:
    """Append-only record of one partition's DP releases in one run (see the module docstring).

    ``params`` (e.g. dp mode, epsilon, delta, noise multiplier, rounds) are written in the first
    line; opening the ledger later with a different partition or different ``params`` raises
    ``LedgerError``. Each release is one line ``{"round", "kind", "epsilon"}``, appended with
    ``O_APPEND`` and fsynced; nothing is ever rewritten.
    """

    FILE = "privacy-ledger.jsonl"

    def __init__(self, state_dir: str | Path, partition_id: int, params: dict[str, Any]) -> None:
        self.partition_id = _check_partition(partition_id)
        self.params = json.loads(json.dumps(params))  # what a JSON round trip gives back, to compare
        folder = Path(state_dir) / f"partition-{partition_id}"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = folder / self.FILE
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            self._read()
        else:
            self._append({"ledger": 1, "partition": self.partition_id, "params": self.params})

    def _read(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        try:
            rows = [json.loads(line) for line in lines]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is damaged ({err}): refusing to release anything "
                              "until it is repaired by hand") from None
        if not rows or not isinstance(rows[0], dict) or rows[0].get("ledger") != 1:
            raise LedgerError(f"privacy ledger {self.path} has no valid first line")
        if rows[0].get("partition") != self.partition_id:
            raise LedgerError(f"privacy ledger {self.path} belongs to partition {rows[0].get('partition')!r}, "
                              f"not {self.partition_id}")
        if rows[0].get("params") != self.params:
            raise LedgerError(f"privacy ledger {self.path} was started with {rows[0].get('params')}, "
                              f"this run asks for {self.params}")
        last = 0
        for row in rows[1:]:
            if not (isinstance(row, dict) and set(row) == {"round", "kind", "epsilon"} and type(row["round"]) is int
                    and row["round"] > last and row["kind"] in ("theta", "statistics")
                    and isinstance(row["epsilon"], (int, float)) and row["epsilon"] >= 0):
                raise LedgerError(f"privacy ledger {self.path}: bad entry {str(row)[:120]}")
            last = row["round"]
        self.entries = rows[1:]

    def _append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path.parent)

    @property
    def last_round(self) -> int:
        return self.entries[-1]["round"] if self.entries else 0

    def releases(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["kind"] == kind]

    @property
    def epsilon(self) -> float:
        """Epsilon spent as of the last release (0.0 before any)."""
        return float(self.entries[-1]["epsilon"]) if self.entries else 0.0

    def check_round(self, server_round: int) -> None:
        """Raise ``LedgerError`` if a release at ``server_round`` would repeat or precede one already made."""
        if type(server_round) is not int or server_round <= self.last_round:
            raise LedgerError(f"partition {self.partition_id}: round {server_round!r} is at or below round "
                              f"{self.last_round}, already released; refusing to release again")

    def accountant(self, noise_multiplier: float, delta: float, budget_epsilon: float, **kwargs: Any) -> ThetaAccountant:
        """The 'theta' accountant with one step per release in the ledger (0 for a new ledger)."""
        return ThetaAccountant(noise_multiplier, delta, budget_epsilon, steps=len(self.releases("theta")), **kwargs)

    def record(self, server_round: int, kind: str, epsilon: float) -> None:
        """Append one release; call it after the noise is drawn and before the reply leaves."""
        self.check_round(server_round)
        if kind not in ("theta", "statistics"):
            raise ValueError(f"kind must be 'theta' or 'statistics', got {kind!r}")
        if kind == "statistics" and self.releases("statistics"):
            raise LedgerError(f"partition {self.partition_id}: statistics were released in round "
                              f"{self.releases('statistics')[0]['round']}; a second release is refused")
        row = {"round": server_round, "kind": kind, "epsilon": float(epsilon)}
        self._append(row)
        self.entries.append(row)
