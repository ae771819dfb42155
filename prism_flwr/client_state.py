"""What a client carries from one round to the next, as bytes.

``ClientRecord`` bundles the training state (Adam moments, objective state) with the privacy
accountant. It is serialised to one ``bytes`` blob that the ClientApp keeps in Flower's
``context.state`` and also writes to ``<dir>/partition-<id>/round-<r>.pt``: a server run resumed
from its round-``r`` checkpoint gets clients that start from exactly their state after round
``r``, even in a new Flower run whose ``context.state`` is empty. A client takes the newest state
saved *before* the current round, so one that sat out rounds keeps its optimiser state, its
released statistics and, above all, its privacy accountant. The two newest files are kept (the
server may die after the clients trained round ``r + 1`` but before it saved round ``r + 1``).

``secret`` seeds the randomness that must stay unknown to the server (DP noise, the mask sampled
from noisy theta): it is drawn from the OS once per client and never leaves the client.
"""

from __future__ import annotations

import io
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .privacy import ThetaAccountant
from .training import ClientState


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
        buf = io.BytesIO()
        torch.save({
            "score_opt": self.train.score_opt,
            "objective": self.train.objective,
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "statistics_epsilon": self.statistics_epsilon,
            "secret": self.secret,
        }, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "ClientRecord":
        d = torch.load(io.BytesIO(blob), weights_only=False)
        acc = ThetaAccountant.from_state(d["accountant"]) if d["accountant"] is not None else None
        return cls(ClientState(d["score_opt"], d["objective"]), acc, d["statistics_epsilon"], d["secret"])


def _saved_rounds(state_dir: Path, partition_id: int) -> dict[int, Path]:
    folder = state_dir / f"partition-{partition_id}"
    return {int(p.stem.split("-")[1]): p for p in folder.glob("round-*.pt")}


def write_state_file(state_dir: Path, partition_id: int, server_round: int, blob: bytes) -> None:
    """Atomically write this round's state; keep the two newest rounds."""
    path = state_dir / f"partition-{partition_id}" / f"round-{server_round}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    for _, old in sorted(_saved_rounds(state_dir, partition_id).items())[:-2]:
        old.unlink(missing_ok=True)


def read_latest_state_file(state_dir: Path, partition_id: int, before_round: int) -> tuple[int, bytes] | None:
    """The newest saved ``(round, blob)`` from a round before ``before_round``, if any."""
    earlier = {r: p for r, p in _saved_rounds(state_dir, partition_id).items() if r < before_round}
    if not earlier:
        return None
    latest = max(earlier)
    return latest, earlier[latest].read_bytes()
