"""What a client carries from one round to the next, as bytes.

``ClientRecord`` bundles the training state (Adam moments, objective state) with the privacy
accountant. It is serialised to one ``bytes`` blob that the ClientApp keeps in Flower's
``context.state`` and also writes to ``<dir>/partition-<id>/round-<r>.pt``: a server run resumed
from its round-``r`` checkpoint gets clients that start from exactly their round-``r`` state,
even in a new Flower run whose ``context.state`` is empty. Only the two newest rounds are kept
on disk (the server may die after the clients trained round ``r + 1`` but before it saved it).
"""

from __future__ import annotations

import io
import os
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
        }, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "ClientRecord":
        d = torch.load(io.BytesIO(blob), weights_only=False)
        acc = ThetaAccountant.from_state(d["accountant"]) if d["accountant"] is not None else None
        return cls(ClientState(d["score_opt"], d["objective"]), acc, d["statistics_epsilon"])


def state_file(state_dir: Path, partition_id: int, server_round: int) -> Path:
    return state_dir / f"partition-{partition_id}" / f"round-{server_round}.pt"


def write_state_file(state_dir: Path, partition_id: int, server_round: int, blob: bytes) -> None:
    """Atomically write this round's state and drop rounds older than the previous one."""
    path = state_file(state_dir, partition_id, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    for old in path.parent.glob("round-*.pt"):
        if int(old.stem.split("-")[1]) < server_round - 1:
            old.unlink(missing_ok=True)


def read_state_file(state_dir: Path, partition_id: int, server_round: int) -> bytes | None:
    path = state_file(state_dir, partition_id, server_round)
    return path.read_bytes() if path.is_file() else None
