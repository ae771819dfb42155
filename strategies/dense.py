"""The dense baseline: FedAvg of the same generator's float32 weights (32 bits per weight up).

``method = "dense"`` trains the weights of the very network PRISM masks (same seed, same init,
same objective) and averages them weighted by ``num-examples``, as McMahan et al.'s FedAvg. It is
what PRISM's 1-bit masks are compared against; replies are validated like PRISM's.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array

from prism_flwr.task import WEIGHTS_KEY

from .base import RecordingFedAvg


class DenseFedAvg(RecordingFedAvg):
    payload_key = WEIGHTS_KEY
    upload_key = WEIGHTS_KEY

    def decode(self, array: Array) -> np.ndarray:
        weights = array.numpy()
        if weights.dtype != np.float32 or weights.shape != (self.num_weights,):
            raise ValueError(f"weights must be float32 of shape ({self.num_weights},), got {weights.dtype} {weights.shape}")
        if not np.isfinite(weights).all():
            raise ValueError("weights contain NaN or inf")
        return weights

    def combine(self, rnd: int, payloads: list[np.ndarray], weights: np.ndarray) -> tuple[np.ndarray, dict]:
        mean = np.zeros(self.num_weights, dtype=np.float64)
        for w, k in zip(payloads, weights):  # one client at a time: no clients x weights matrix
            mean += (k / weights.sum()) * w
        return mean.astype(np.float32), {}
