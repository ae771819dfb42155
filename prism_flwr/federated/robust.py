"""Robust counting of client masks: what a few hostile clients can do to theta, bounded.

Three pure functions on packed masks, each usable alone: ``distinct_masks`` (identical masks, i.e.
Sybils, count once), ``consensus_distances`` + ``outliers`` (masks far from the per-weight majority
in Hamming distance are dropped) and ``trimmed_counts`` (per weight, ``trim`` votes cut at each
end). ``robust_counts`` chains them and returns counts in ``count_ones``' form, so every
aggregation rule runs unchanged after it. Why each works: docs/security.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from prism_flwr.federated.aggregation import AggregationError, count_ones

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
MAD_TO_SD = 1.4826  # MAD of a normal distribution x this = its standard deviation


def distinct_masks(packed_masks: Sequence[np.ndarray]) -> list[int]:
    """Indices of the first occurrence of every distinct mask (duplicates are dropped)."""
    return sorted(set(first_copies(packed_masks).values()))


def first_copies(packed_masks: Sequence[np.ndarray]) -> dict[int, int]:
    """Every mask's index -> the index of the first mask identical to it (itself if none before)."""
    first: dict[bytes, int] = {}
    out = {}
    for i, packed in enumerate(packed_masks):
        digest = hashlib.sha256(np.ascontiguousarray(packed).tobytes()).digest()
        out[i] = first.setdefault(digest, i)
    return out


def majority(counts: np.ndarray, k: int) -> np.ndarray:
    """Packed per-weight majority vote (1 where more than half of the ``k`` masks hold a 1)."""
    return np.packbits(2 * counts.astype(np.int64) > k, bitorder="little")


def consensus_distances(
    packed_masks: Sequence[np.ndarray], count: int, counts: np.ndarray | None = None
) -> np.ndarray:
    """Fraction of the ``count`` weights where each mask differs from the majority vote of all."""
    if counts is None:
        counts, _ = count_ones(packed_masks, count)
    cons = majority(counts, len(packed_masks))
    return np.array(
        [int(_POPCOUNT[np.bitwise_xor(p, cons)].sum(dtype=np.int64)) / count for p in packed_masks]
    )


def outliers(distances: np.ndarray, outlier_mads: float = 3.0, min_spread: float = 0.01) -> np.ndarray:
    """Boolean array: True for a distance above ``median + outlier_mads * max(1.4826 MAD, min_spread)``.

    Never flags more than ``(K - 1) // 2`` of the K masks (the farthest ones): a majority is
    always kept.
    """
    d = np.asarray(distances, dtype=np.float64)
    flagged = np.zeros(len(d), dtype=bool)
    if len(d) < 3 or outlier_mads <= 0:
        return flagged
    over = np.flatnonzero(d > outlier_threshold(d, outlier_mads, min_spread))
    worst = over[np.argsort(-d[over], kind="stable")][: (len(d) - 1) // 2]
    flagged[worst] = True
    return flagged


def outlier_threshold(distances: np.ndarray, outlier_mads: float = 3.0, min_spread: float = 0.01) -> float:
    """``median + outlier_mads * max(1.4826 MAD, min_spread)`` of the distances."""
    d = np.asarray(distances, dtype=np.float64)
    med = float(np.median(d))
    return med + outlier_mads * max(MAD_TO_SD * float(np.median(np.abs(d - med))), min_spread)


def trimmed_counts(counts: np.ndarray, k: int, trim: int) -> tuple[np.ndarray, int]:
    """Coordinate-wise trimmed mean for bits: ``(clip(c - t, 0, k - 2t), k - 2t)`` with
    ``t = min(trim, (k - 1) // 2)`` so at least one vote per weight is kept."""
    if k < 1:
        raise ValueError("cannot trim zero masks")
    t = max(0, min(int(trim), (k - 1) // 2))
    if t == 0:
        return counts, k
    return np.clip(counts.astype(np.int64) - t, 0, k - 2 * t).astype(np.uint32), k - 2 * t


@dataclass
class RobustInfo:
    """What ``robust_counts`` did, for the round record."""

    kept: list[int] = field(default_factory=list)  # indices into the input masks
    duplicates: list[int] = field(default_factory=list)  # dropped as copies of an earlier mask
    outliers: list[int] = field(default_factory=list)  # dropped by the Hamming filter
    distinct: list[int] = field(default_factory=list)  # first copy of every distinct mask
    distances: list[float] = field(default_factory=list)  # of the distinct masks, input order
    trim: int = 0  # votes trimmed at each end per weight
    copy_of: dict[int, int] = field(default_factory=dict)  # duplicate -> the first mask it copies
    threshold: float | None = None  # the Hamming filter's cut-off, if it ran

    def record(self) -> dict:
        return {
            "robust_dropped_duplicates": self.duplicates,
            "robust_dropped_outliers": self.outliers,
            "robust_trim": self.trim,
        }

    def dropped(self, nodes: Sequence[object]) -> list[dict]:
        """Every dropped mask as ``{"node", "reason"}``, ``nodes[i]`` the sender of input mask ``i``."""
        out = [
            {"node": nodes[i], "reason": f"same mask as node {nodes[self.copy_of[i]]} (duplicate)"}
            for i in self.duplicates
        ]
        distance = dict(zip(self.distinct, self.distances))
        out += [
            {
                "node": nodes[i],
                "reason": f"Hamming distance {distance[i]:.4f} to the majority vote, "
                f"above the cut-off {self.threshold:.4f}",
            }
            for i in self.outliers
        ]
        return sorted(out, key=lambda d: str(d["node"]))


def robust_counts(
    packed_masks: Sequence[np.ndarray],
    count: int,
    *,
    trim: int = 1,
    outlier_mads: float = 3.0,
    min_spread: float = 0.01,
) -> tuple[np.ndarray, int, RobustInfo]:
    """Drop-in for ``count_ones`` with duplicates removed, Hamming outliers removed and ``trim``
    votes trimmed per weight: returns ``(counts, k, info)`` for ``aggregation.aggregate``."""
    packed_masks = list(packed_masks)
    if not packed_masks:
        raise AggregationError("cannot aggregate zero masks")
    info = RobustInfo()
    first = first_copies(packed_masks)
    distinct = info.distinct = sorted(set(first.values()))
    info.copy_of = {i: j for i, j in first.items() if i != j}
    info.duplicates = sorted(info.copy_of)
    masks = [packed_masks[i] for i in distinct]
    counts, k = count_ones(masks, count)
    if outlier_mads > 0 and k >= 3:
        dist = consensus_distances(masks, count, counts)
        info.distances = [float(x) for x in dist]
        info.threshold = outlier_threshold(dist, outlier_mads, min_spread)
        flagged = outliers(dist, outlier_mads, min_spread)
        if flagged.any():
            info.outliers = [distinct[i] for i in np.flatnonzero(flagged)]
            masks = [m for m, f in zip(masks, flagged) if not f]
            counts, k = count_ones(masks, count)
    info.kept = [i for i in distinct if i not in set(info.outliers)]
    counts, k_trim = trimmed_counts(counts, k, trim)
    info.trim = (k - k_trim) // 2
    return counts, k_trim, info
