"""Server-side aggregation of binary masks: smoothed mean, MADA, plain mean.

For each masked weight, with ``K`` masks received in round ``t`` and ``c`` of them holding a 1:

1. smoothing (``0 -> eps``, ``1 -> 1 - eps``, ``eps = 0.01``) then the mean over clients::

       theta_agg = (c (1 - eps) + (K - c) eps) / K = eps + (1 - 2 eps) c / K,
       s_agg = logit(theta_agg)

   so ``s_agg`` is finite even where every client agrees.
2. MADA (mask-aware dynamic moving average). Sample ``M_old ~ Bernoulli(sigmoid(s_t))`` and
   ``M_new ~ Bernoulli(theta_agg)``; ``lambda`` = fraction of positions where they differ
   (Hamming distance over all masked weights). Then

   - ``"score"`` (official code, default): ``s_{t+1} = lambda s_agg + (1 - lambda) s_t``;
   - ``"probability"`` (the paper's figure): ``theta_{t+1} = lambda' theta_t + (1 - lambda') theta_agg``
     with ``lambda' = 1 - lambda`` (mask correlation), ``s_{t+1} = logit(theta_{t+1})``.

   A big change between the old and the new global mask moves the model far; a small one
   keeps it close. No extra hyper-parameter.
3. ``"mean"`` (PRISM without MADA, the paper's PRISM-dagger): ``s_{t+1} = s_agg``.

Counting works on packed bits, one client at a time: memory is one ``uint16``/``uint32`` count
per weight, never a clients x weights float32 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

AGGREGATIONS = ("mada", "mean")
MADA_SPACES = ("score", "probability")
EPS = 0.01


def count_ones(packed_masks: Iterable[np.ndarray], count: int) -> tuple[np.ndarray, int]:
    """Per-weight number of ones over packed masks; returns ``(counts, number_of_masks)``."""
    # Adding uint8 into uint8 is ~4x faster than widening each client to uint32, so count in a
    # uint8 block and flush it into the uint32 total before it can overflow (every 255 masks).
    counts = np.zeros(count, dtype=np.uint32)
    block = np.zeros(count, dtype=np.uint8)
    k = 0
    for packed in packed_masks:
        np.add(block, np.unpackbits(packed, count=count, bitorder="little"), out=block)
        k += 1
        if k % 255 == 0:
            counts += block
            block[:] = 0
    counts += block
    return counts, k


def smoothed_mean(counts: np.ndarray, k: int, eps: float = EPS) -> np.ndarray:
    """``theta_agg = eps + (1 - 2 eps) counts / k`` (float32)."""
    if k < 1:
        raise ValueError("cannot aggregate zero masks")
    return (eps + (1.0 - 2.0 * eps) * (counts.astype(np.float32) / np.float32(k))).astype(np.float32)


def logit(p: np.ndarray) -> np.ndarray:
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def sigmoid(s: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * s))).astype(np.float32)  # tanh form: no overflow warnings


def hamming_lambda(theta_old: np.ndarray, theta_new: np.ndarray, rng: np.random.Generator) -> float:
    """Fraction of positions where ``Bernoulli(theta_old)`` and ``Bernoulli(theta_new)`` samples differ."""
    m_old = rng.random(theta_old.shape, dtype=np.float32) < theta_old
    m_new = rng.random(theta_new.shape, dtype=np.float32) < theta_new
    return float(np.count_nonzero(m_old != m_new)) / theta_old.size


@dataclass(frozen=True)
class AggregateResult:
    scores: np.ndarray      # s_{t+1}, float32
    mada_lambda: float      # Hamming distance between old and new global mask samples (nan for "mean")


def aggregate(scores: np.ndarray, counts: np.ndarray, k: int, *, method: str = "mada",
              space: str = "score", rng: np.random.Generator, eps: float = EPS) -> AggregateResult:
    """New global scores from the current ones and the per-weight mask counts of ``k`` clients."""
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}")
    if space not in MADA_SPACES:
        raise ValueError(f"mada space must be one of {MADA_SPACES}, got {space!r}")
    theta_agg = smoothed_mean(counts, k, eps)
    if method == "mean":
        return AggregateResult(logit(theta_agg), float("nan"))
    lam = hamming_lambda(sigmoid(scores), theta_agg, rng)
    return AggregateResult(mada_blend(scores, theta_agg, lam, space), lam)


def mada_blend(scores: np.ndarray, theta_agg: np.ndarray, lam: float, space: str = "score") -> np.ndarray:
    """Move the global scores toward the aggregate by ``lam`` (score space or probability space)."""
    if space == "score":
        return (lam * logit(theta_agg) + (1.0 - lam) * scores).astype(np.float32)
    # theta_{t+1} = lambda' theta_t + (1 - lambda') theta_agg with lambda' = 1 - lam. Clip so the
    # logit stays finite where theta_t had saturated in float32.
    theta = np.clip((1.0 - lam) * sigmoid(scores) + lam * theta_agg, 1e-7, 1 - 1e-7)
    return logit(theta)
