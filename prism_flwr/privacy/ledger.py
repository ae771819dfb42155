"""The node's privacy ledger: every DP release made from the node's data, across all runs, per example.

One ledger per node (``<state-dir>/privacy/ledger.jsonl``), never keyed by what a server sends. Each
release names the examples it touched by content (``ExampleSet``: a 64-bit hash of each image's
bytes), so whatever partition ids, seeds or partitioning a server names, an example's epsilon is the
RDP composition of every release that touched it, and a release goes only if no example it touches
passes the node's budget. Append-only JSON lines, fsynced before a release leaves; an exclusive
``fcntl`` lock makes check + release + record one step for concurrent processes. Released statistics
are kept in their line, so a lost client state reuses them instead of releasing again.
See docs/privacy.md, "The node's ledger".
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_flwr.privacy.accounting import epsilon_of_releases, within
from prism_flwr.storage.files import write_bytes_atomic

VERSION = 3
KINDS = ("theta", "statistics")
ALL = "all"  # a release that counts against every example (rows carried over from a per-partition ledger)
Released = tuple[torch.Tensor, torch.Tensor, float]  # (mu, var, epsilon) of a statistics release
_RUN = re.compile(r"[0-9a-f]{8,64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class LedgerError(RuntimeError):
    """The ledger refuses a release: budget spent, a repeated round, or a damaged ledger."""


@dataclass(frozen=True)
class ExampleSet:
    """The examples one client's data holds: sorted unique 64-bit content hashes, and their digest."""

    ids: np.ndarray
    digest: str

    @classmethod
    def of(cls, ids: np.ndarray) -> ExampleSet:
        ids = np.unique(np.asarray(ids, dtype=np.uint64))
        return cls(ids, hashlib.sha256(ids.astype("<u8").tobytes()).hexdigest())


def example_ids(images) -> ExampleSet:
    """The content hashes of ``images`` (float in [-1, 1] as the client trains on them, uint8, or
    anything holding uint8 ``pixels``): each image's uint8 bytes, hashed (blake2b, 8 bytes)."""
    images = getattr(images, "pixels", images)
    if images.dtype != torch.uint8:
        images = ((images.detach().cpu().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    rows = images.reshape(len(images), -1).cpu().numpy()
    hashes = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in rows]
    return ExampleSet.of(np.array(hashes, dtype=np.uint64))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().cpu().float().numpy().astype("<f4").tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4").copy())


def _valid_row(row: Any) -> bool:
    fields = {"run", "round", "kind", "z", "examples"}
    ok = (
        isinstance(row, dict)
        and fields <= set(row)
        and isinstance(row["run"], str)
        and _RUN.fullmatch(row["run"]) is not None
        and type(row["round"]) is int
        and row["round"] >= 1
        and row["kind"] in KINDS
        and isinstance(row["z"], (int, float))
        and math.isfinite(row["z"])
        and row["z"] > 0
        and isinstance(row["examples"], str)
        and (row["examples"] == ALL or _DIGEST.fullmatch(row["examples"]) is not None)
    )
    if not ok or row["kind"] == "theta":
        return ok and set(row) == fields
    return (
        set(row) == fields | {"params", "mu", "var", "epsilon"}
        and isinstance(row["params"], dict)
        and isinstance(row["mu"], str)
        and isinstance(row["var"], str)
        and isinstance(row["epsilon"], (int, float))
        and 0 <= row["epsilon"] < math.inf
    )


class PrivacyLedger:
    """The node's releases; ``budget`` epsilon at ``delta`` per example, for all runs together."""

    FILE, LOCK, SETS = "ledger.jsonl", "ledger.lock", "examples"

    def __init__(self, state_dir: str | Path, budget: float, delta: float) -> None:
        self.budget, self.delta = float(budget), float(delta)
        self.folder = Path(state_dir).expanduser() / "privacy"
        self.path = self.folder / self.FILE
        self.entries: list[dict[str, Any]] = []
        self._sets: dict[str, np.ndarray] = {}

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
        self._sets = {}  # example sets are read and checked afresh under each lock
        if not self.path.exists():
            self._append({"ledger": VERSION})
            for row in _older_rows(self.folder):
                self._append(row)
        try:
            rows = [json.loads(line) for line in self.path.read_bytes().splitlines()]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LedgerError(
                f"privacy ledger {self.path} is damaged ({err}): no release until it is repaired by hand"
            ) from None
        if not rows or rows[0] != {"ledger": VERSION}:
            raise LedgerError(f"privacy ledger {self.path} has no valid first line")
        last: dict[tuple[str, str], int] = {}
        for row in rows[1:]:
            key = (row.get("run"), row.get("examples")) if isinstance(row, dict) else None
            if not _valid_row(row) or (row["examples"] != ALL and row["round"] <= last.get(key, 0)):
                raise LedgerError(f"privacy ledger {self.path}: bad entry {str(row)[:120]}")
            last[key] = row["round"]
        self.entries = rows[1:]

    def _append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _set(self, digest: str) -> np.ndarray:
        if digest not in self._sets:
            path = self.folder / self.SETS / f"{digest}.npy"
            try:
                ids = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise LedgerError(f"privacy ledger: example set {path} unreadable ({err})") from None
            if ids.dtype != np.uint64 or ExampleSet.of(ids).digest != digest:
                raise LedgerError(f"privacy ledger: example set {path} does not match its name")
            self._sets[digest] = ids
        return self._sets[digest]

    # -- reading (call inside ``locked``)
    def run_multipliers(self, run: str, examples: ExampleSet) -> list[float]:
        """The noise multipliers of ``run``'s releases from these examples (one client's, in one run)."""
        return [e["z"] for e in self.entries if e["run"] == run and e["examples"] == examples.digest]

    def spent(self, examples: ExampleSet, extra: tuple[float, ...] = ()) -> float:
        """The largest epsilon (at the node's delta) of any example in ``examples``, over every release
        that touched it, plus releases of multipliers ``extra`` touching them all."""
        if len(examples.ids) == 0:
            return epsilon_of_releases(extra, self.delta)
        rows: dict[str, np.ndarray] = {ALL: np.ones(len(examples.ids), bool)}  # per example set, once
        for digest in {e["examples"] for e in self.entries} - {ALL}:
            rows[digest] = np.isin(examples.ids, self._set(digest))
        touched = np.stack([rows[e["examples"]] for e in self.entries] or [np.zeros(len(examples.ids), bool)])
        patterns = np.unique(np.packbits(touched, axis=0), axis=1)  # one column per distinct set of releases
        zs = [e["z"] for e in self.entries]
        return max(
            epsilon_of_releases(
                [zs[i] for i in np.flatnonzero(np.unpackbits(col)[: len(zs)])] + list(extra), self.delta
            )
            for col in patterns.T
        )

    def find_statistics(self, params: dict[str, Any], examples: ExampleSet) -> dict[str, Any] | None:
        params = json.loads(json.dumps(params))
        return next(
            (
                e
                for e in self.entries
                if e["kind"] == "statistics" and e["params"] == params and e["examples"] == examples.digest
            ),
            None,
        )

    def check(
        self, run: str, server_round: int, z: float, examples: ExampleSet, run_budget: float | None = None
    ) -> None:
        """``LedgerError`` unless a release of multiplier ``z`` at ``server_round`` of ``run`` from
        ``examples`` may go: a later round than this client's last in the run, within the run's
        ``run_budget`` and within the node's budget for every example it touches."""
        if not (isinstance(run, str) and _RUN.fullmatch(run)):
            raise LedgerError(f"run tag {str(run)[:80]!r} is not 8-64 lowercase hex characters")
        mine = [e for e in self.entries if e["run"] == run and e["examples"] == examples.digest]
        last = max((e["round"] for e in mine), default=0)
        if type(server_round) is not int or server_round <= last:
            raise LedgerError(
                f"round {server_round!r} is at or below round {last}, already released in this "
                "run; refusing to release again"
            )
        if run_budget is not None:
            run_eps = epsilon_of_releases([e["z"] for e in mine] + [z], self.delta)
            if not within(run_eps, run_budget):
                raise LedgerError(
                    f"the run's privacy budget dp-epsilon={run_budget:g} is spent (one more release: "
                    f"{run_eps:.3f}); not training"
                )
        after = self.spent(examples, (z,))
        if not within(after, self.budget):
            raise LedgerError(
                f"node privacy budget spent: this release would bring its data's epsilon to {after:.3f} > "
                f"{self.budget:g} (delta {self.delta:g}, node-config dp-budget); refusing. A simulation's "
                "nodes start afresh with another state-dir (PRISM_NODE_CONFIG=\"state-dir='...'\")"
            )

    # -- writing (call inside ``locked``, after ``check``)
    def record(
        self, run: str, server_round: int, kind: str, z: float, examples: ExampleSet, **extra: Any
    ) -> None:
        self.check(run, server_round, z, examples)
        path = self.folder / self.SETS / f"{examples.digest}.npy"
        if not path.exists():  # the set is written (atomically) before any line names it
            path.parent.mkdir(exist_ok=True, mode=0o700)
            write_bytes_atomic(path, _npy(examples.ids), 0o600)
        row = {
            "run": run,
            "round": server_round,
            "kind": kind,
            "z": float(z),
            "examples": examples.digest,
            **extra,
        }
        if not _valid_row(json.loads(json.dumps(row))):
            raise ValueError(f"not a ledger entry: {str(row)[:120]}")
        self._append(row)
        self.entries.append(row)
        self._sets[examples.digest] = examples.ids


def _npy(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, ids.astype(np.uint64), allow_pickle=False)
    return buf.getvalue()


def _older_rows(folder: Path) -> list[dict[str, Any]]:
    """Releases in the per-partition ledgers of earlier versions (``privacy/<digest>/ledger.jsonl``),
    carried over as counting against every example: their example sets were not recorded."""
    rows = []
    for path in sorted(folder.glob("*/ledger.jsonl")):
        for line in path.read_bytes().splitlines()[1:]:
            try:
                row = json.loads(line)
            except ValueError:
                raise LedgerError(f"earlier privacy ledger {path} is damaged: repair it by hand") from None
            rows.append(
                {"run": row["run"], "round": row["round"], "kind": "theta", "z": row["z"], "examples": ALL}
            )
    return rows


class LedgerSession:
    """What one client round asks of the node's ledger; the lock is held around each release."""

    def __init__(self, ledger: PrivacyLedger, run: str, server_round: int, examples: ExampleSet) -> None:
        self.ledger, self.run, self.server_round, self.examples = ledger, run, server_round, examples

    def run_epsilon(self) -> float:
        """This client's epsilon in this run so far (at the node's delta)."""
        with self.ledger.locked() as led:
            return epsilon_of_releases(led.run_multipliers(self.run, self.examples), led.delta)

    def precheck(self, z: float, run_budget: float | None = None, params: dict | None = None) -> None:
        """Refuse before any training when the next release could not go (checked again, locked)."""
        with self.ledger.locked() as led:
            if params is not None and led.find_statistics(params, self.examples) is not None:
                return
            led.check(self.run, self.server_round, z, self.examples, run_budget)

    @contextmanager
    def theta_release(self, z: float, run_budget: float | None = None) -> Iterator[None]:
        """Check, release (the ``with`` body), record: nothing is recorded if the body raises."""
        with self.ledger.locked() as led:
            led.check(self.run, self.server_round, z, self.examples, run_budget)
            yield
            led.record(self.run, self.server_round, "theta", z, self.examples)

    def statistics(
        self,
        params: dict[str, Any],
        z: float,
        release: Callable[[], tuple[torch.Tensor, torch.Tensor, float]],
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The statistics released earlier from these examples with ``params`` (no new spend), else
        ``release()`` recorded."""
        with self.ledger.locked() as led:
            if (found := led.find_statistics(params, self.examples)) is not None:
                try:
                    return _unb64(found["mu"]), _unb64(found["var"]), float(found["epsilon"])
                except ValueError as err:  # binascii.Error and a length that is no float32 count
                    raise LedgerError(
                        f"privacy ledger {led.path}: released statistics unreadable ({err})"
                    ) from None
            led.check(self.run, self.server_round, z, self.examples)
            mu, var, eps = release()
            extra = {"params": params, "epsilon": float(eps), "mu": _b64(mu), "var": _b64(var)}
            led.record(self.run, self.server_round, "statistics", z, self.examples, **extra)
            return mu, var, eps
