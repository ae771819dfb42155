"""The dense baseline: FedAvg of the same generator's float32 weights (32 bits per weight up).

``method = "dense"`` trains the weights of the very network PRISM masks (same seed, same init,
same objective) and averages them. It is what PRISM's 1-bit masks are compared against; replies
are validated like PRISM's.

Two departures from McMahan et al.'s FedAvg, because a client chooses what it reports:

- clients count equally: ``num-examples`` is the client's own claim, so weighting by it would let
  one client take over the average by claiming the whole dataset (the partitions of ``iid`` and
  ``shards`` are equal anyway);
- each client's update ``w_i - w_global`` is clipped to ``clip_factor`` times the round's median
  update norm, so no single client can move the model further than a few honest ones would.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array

from prism_flwr.federated.methods import DENSE
from prism_flwr.federated.records import WEIGHTS_KEY

from .base import RecordingFedAvg
from .replies import ReplyRejected


def clip_to_median(updates: list[np.ndarray], factor: float) -> tuple[list[np.ndarray], float]:
    """Scale every update whose L2 norm exceeds ``factor`` x the median norm down to that bound.
    Returns the clipped updates and the bound."""
    norms = np.array([float(np.linalg.norm(u.astype(np.float64))) for u in updates])
    bound = factor * float(np.median(norms))
    return [u * np.float32(min(1.0, bound / n)) if n > 0 else u for u, n in zip(updates, norms)], bound


class DenseFedAvg(RecordingFedAvg):
    method = DENSE
    payload_key = WEIGHTS_KEY
    upload_key = WEIGHTS_KEY

    def __init__(self, *, clip_factor: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip_factor = clip_factor

    def decode(self, array: Array) -> np.ndarray:
        weights = array.numpy()
        if weights.dtype != np.float32 or weights.shape != (self.num_weights,):
            raise ReplyRejected(
                f"weights must be float32 of shape ({self.num_weights},), got {weights.dtype} {weights.shape}"
            )
        if not np.isfinite(weights).all():
            raise ReplyRejected("weights contain NaN or inf")
        return weights

    def combine(self, rnd: int, payloads: list[np.ndarray], weights: np.ndarray) -> tuple[np.ndarray, dict]:
        base = self._global.astype(np.float32)
        updates, bound = clip_to_median([w - base for w in payloads], self.clip_factor)
        mean = np.zeros(self.num_weights, dtype=np.float64)
        for u in updates:  # one client at a time: no clients x weights matrix
            mean += u
        return (base + mean / len(updates)).astype(np.float32), {"update_norm_bound": bound}
