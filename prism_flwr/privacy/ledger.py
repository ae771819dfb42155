"""The node's privacy ledger: every DP release made from one data set, across all runs.

Kept on the node (``<state-dir>/privacy/<digest of the data key>/ledger.jsonl``), keyed by the data
the node's own config names, never by what a server sends: a new run tag, seed or round count
opens no fresh budget. All releases compose in RDP against the node's budget (``accounting``).
Append-only JSON lines, fsynced before a release leaves; an exclusive ``fcntl`` lock makes
check + release + record one step for concurrent processes. The released statistics are kept in
their ledger line, so a lost client state reuses them instead of releasing again.
See docs/privacy.md, "The node's ledger".
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_flwr.privacy.accounting import REL_TOL, ThetaAccountant, epsilon_of_releases

KINDS = ("theta", "statistics")
_RUN = re.compile(r"[0-9a-f]{8,64}")


class LedgerError(RuntimeError):
    """The ledger refuses a release: budget spent, a repeated round, or a damaged ledger."""


def ledger_folder(state_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(state_dir).expanduser() / "privacy" / digest


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().cpu().float().numpy().astype("<f4").tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4").copy())


def _valid_row(row: Any) -> bool:
    if not isinstance(row, dict) or not {"run", "round", "kind", "z"} <= set(row):
        return False
    if not (
        isinstance(row["run"], str)
        and _RUN.fullmatch(row["run"])
        and type(row["round"]) is int
        and row["round"] >= 1
        and row["kind"] in KINDS
        and isinstance(row["z"], (int, float))
        and math.isfinite(row["z"])
        and row["z"] > 0
    ):
        return False
    if row["kind"] == "statistics":
        return (
            set(row) == {"run", "round", "kind", "z", "params", "mu", "var", "epsilon"}
            and isinstance(row["params"], dict)
            and isinstance(row["mu"], str)
            and isinstance(row["var"], str)
            and isinstance(row["epsilon"], (int, float))
            and 0 <= row["epsilon"] < math.inf
        )
    return set(row) == {"run", "round", "kind", "z"}


class PrivacyLedger:
    """One data set's releases; ``budget`` epsilon at ``delta`` is the node's, for all runs together."""

    FILE, LOCK = "ledger.jsonl", "ledger.lock"

    def __init__(self, state_dir: str | Path, key: dict[str, Any], budget: float, delta: float) -> None:
        self.key = json.loads(json.dumps(key))
        self.budget, self.delta = float(budget), float(delta)
        self.folder = ledger_folder(state_dir, self.key)
        self.path = self.folder / self.FILE
        self.entries: list[dict[str, Any]] = []

    @contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold the ledger's exclusive lock and its current content (read afresh) for one step."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.folder / self.LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._read()
            yield self
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> None:
        if not self.path.exists():
            self._append({"ledger": 2, "key": self.key})
            self.entries = []
            return
        lines = self.path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        try:
            rows = [json.loads(line) for line in lines]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LedgerError(
                f"privacy ledger {self.path} is damaged ({err}): no release until it is repaired by hand"
            ) from None
        head = rows[0] if rows and isinstance(rows[0], dict) else {}
        if head.get("ledger") != 2 or head.get("key") != self.key:
            raise LedgerError(f"privacy ledger {self.path} has no valid first line for this data")
        last: dict[str, int] = {}
        for row in rows[1:]:
            if not _valid_row(row) or row["round"] <= last.get(row["run"], 0):
                raise LedgerError(f"privacy ledger {self.path}: bad entry {str(row)[:120]}")
            last[row["run"]] = row["round"]
        self.entries = rows[1:]

    def _append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- reading (call inside ``locked``)
    def run_entries(self, run: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["run"] == run and kind in (None, e["kind"])]

    def spent(self, extra: tuple[float, ...] = ()) -> float:
        """The node's epsilon at its delta over every release, plus releases of multipliers ``extra``."""
        return epsilon_of_releases([e["z"] for e in self.entries] + list(extra), self.delta)

    def accountant(
        self, run: str, noise_multiplier: float, delta: float, run_budget: float
    ) -> ThetaAccountant:
        """This run's theta accountant: one step per theta release of ``run`` in the ledger."""
        return ThetaAccountant(noise_multiplier, delta, run_budget, steps=len(self.run_entries(run, "theta")))

    def find_statistics(self, params: dict[str, Any]) -> dict[str, Any] | None:
        params = json.loads(json.dumps(params))
        return next((e for e in self.entries if e["kind"] == "statistics" and e["params"] == params), None)

    def check(self, run: str, server_round: int, z: float) -> None:
        """``LedgerError`` unless a release of multiplier ``z`` at ``server_round`` of ``run`` may go."""
        if not (isinstance(run, str) and _RUN.fullmatch(run)):
            raise LedgerError(f"run tag {str(run)[:80]!r} is not 8-64 lowercase hex characters")
        last = max((e["round"] for e in self.run_entries(run)), default=0)
        if type(server_round) is not int or server_round <= last:
            raise LedgerError(
                f"round {server_round!r} is at or below round {last}, already released in this "
                "run; refusing to release again"
            )
        after = self.spent((z,))
        if after > self.budget * (1.0 + REL_TOL):
            raise LedgerError(
                f"node privacy budget: this release would bring the data's epsilon to "
                f"{after:.3f} > {self.budget:g} (delta {self.delta:g}, node-config dp-budget); "
                "refusing"
            )

    # -- writing (call inside ``locked``, after ``check``)
    def record(self, run: str, server_round: int, kind: str, z: float, **extra: Any) -> None:
        self.check(run, server_round, z)
        row = {"run": run, "round": server_round, "kind": kind, "z": float(z), **extra}
        if not _valid_row(json.loads(json.dumps(row))):
            raise ValueError(f"not a ledger entry: {str(row)[:120]}")
        self._append(row)
        self.entries.append(row)


class LedgerSession:
    """What one client round asks of the ledger; the lock is held around each release."""

    def __init__(self, ledger: PrivacyLedger, run: str, server_round: int) -> None:
        self.ledger, self.run, self.server_round = ledger, run, server_round

    @contextmanager
    def theta_release(self, z: float) -> Iterator[None]:
        """Check, release (the ``with`` body), record: nothing is recorded if the body raises."""
        with self.ledger.locked() as led:
            led.check(self.run, self.server_round, z)
            yield
            led.record(self.run, self.server_round, "theta", z)

    def statistics(
        self,
        params: dict[str, Any],
        z: float,
        release: Callable[[], tuple[torch.Tensor, torch.Tensor, float]],
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The statistics released earlier with ``params`` (no new spend), else ``release()`` recorded."""
        with self.ledger.locked() as led:
            if (found := led.find_statistics(params)) is not None:
                try:
                    return _unb64(found["mu"]), _unb64(found["var"]), float(found["epsilon"])
                except ValueError as err:  # binascii.Error and a length that is no float32 count
                    raise LedgerError(
                        f"privacy ledger {led.path}: released statistics unreadable ({err})"
                    ) from None
            led.check(self.run, self.server_round, z)
            mu, var, eps = release()
            led.record(
                self.run,
                self.server_round,
                "statistics",
                z,
                params=params,
                epsilon=float(eps),
                mu=_b64(mu),
                var=_b64(var),
            )
            return mu, var, eps

    def precheck(self, kind: str, z: float, params: dict[str, Any] | None = None) -> None:
        """Refuse before any training when the next release could not go (it is checked again, locked)."""
        with self.ledger.locked() as led:
            if kind == "statistics" and led.find_statistics(params or {}) is not None:
                return
            led.check(self.run, self.server_round, z)
