"""Robust counting of masks (prism_flwr/federated/robust.py): hand-computed cases and one invariant."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_flwr.federated.aggregation import count_ones
from prism_flwr.federated.robust import (
    consensus_distances,
    distinct_masks,
    majority,
    outliers,
    robust_counts,
    trimmed_counts,
)


def packed(bits: str) -> np.ndarray:
    """'11000001' -> packed little-endian bits, weight i = character i."""
    return np.packbits(np.array([c == "1" for c in bits]), bitorder="little")


def test_trimmed_counts_by_hand():
    counts = np.array([0, 1, 2, 3, 4], dtype=np.uint32)
    got, k = trimmed_counts(counts, 4, 1)  # drop one vote from each end: clip(c - 1, 0, 2) of 2
    assert k == 2 and got.tolist() == [0, 0, 1, 2, 2]
    got, k = trimmed_counts(counts, 4, 9)  # at most (k - 1) // 2 = 1 per end
    assert k == 2 and got.tolist() == [0, 0, 1, 2, 2]
    got, k = trimmed_counts(np.array([0, 1], dtype=np.uint32), 1, 1)  # one mask: nothing to trim
    assert k == 1 and got.tolist() == [0, 1]
    with pytest.raises(ValueError):
        trimmed_counts(counts, 0, 1)


def test_duplicates_and_consensus_distances_by_hand():
    a, b, c = packed("11110000"), packed("11100000"), packed("00001111")
    assert distinct_masks([a, b, a, c, b]) == [0, 1, 3]
    counts, k = count_ones([a, b, c], 8)  # [2, 2, 2, 1, 1, 1, 1, 1]
    assert majority(counts, k).tolist() == packed("11100000").tolist()
    # a differs at weight 3; b nowhere; c at weights 0-2 and 4-7
    assert consensus_distances([a, b, c], 8).tolist() == [1 / 8, 0.0, 7 / 8]


def test_outliers_by_hand():
    d = np.array([0.30, 0.31, 0.29, 0.30, 0.80])
    # median 0.30, MAD 0.01 -> sd 0.014826; threshold 0.30 + 3 * 0.014826 = 0.3445
    assert outliers(d, 3.0, min_spread=0.0).tolist() == [False, False, False, False, True]
    assert not outliers(
        np.array([0.30, 0.31, 0.29, 0.30, 0.33]), 3.0, min_spread=0.01
    ).any()  # floor: 0.33 < 0.33
    # median 0.25, MAD 0.25 -> 0.37; threshold 0.25 + 0.1 * 0.37 flags 0.5 and 0.6, but at most (4 - 1) // 2 = 1
    assert outliers(np.array([0.0, 0.0, 0.5, 0.6]), 0.1).tolist() == [False, False, False, True]
    assert not outliers(np.array([0.0, 0.9]), 0.1).any()  # fewer than 3 masks: nothing to compare
    assert not outliers(d, 0.0).any()  # 0 turns the filter off


def test_robust_counts_by_hand():
    """Four honest masks, an all-ones attacker sending under two identities (Sybils)."""
    h1, h2, h3, h4 = packed("11000000"), packed("11100000"), packed("11000001"), packed("01000000")
    attack = packed("11111111")
    counts, k, info = robust_counts([h1, attack, h2, h3, attack, h4], 8, trim=1, outlier_mads=3.0)
    # duplicates: the second attack (index 4). Distinct counts [4, 5, 2, 1, 1, 1, 1, 2] of 5, majority
    # 11000000; distances h1 0, h2 1/8, h3 1/8, h4 1/8, attack 6/8; median 1/8, MAD 0 -> floor 0.01:
    # threshold 0.155 drops the attack. Honest counts [3, 4, 1, 0, 0, 0, 0, 1] of 4, trimmed by 1:
    # clip(c - 1, 0, 2) of 2.
    assert info.duplicates == [4] and info.outliers == [1] and info.kept == [0, 2, 3, 5] and info.trim == 1
    assert info.distances == [0.0, 6 / 8, 1 / 8, 1 / 8, 1 / 8]
    assert k == 2 and counts.tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
    assert info.record() == {
        "robust_dropped_duplicates": [4],
        "robust_dropped_outliers": [1],
        "robust_trim": 1,
    }
    # which masks were dropped and why, named by their senders
    assert info.dropped(["a", "b", "c", "d", "e", "f"]) == [
        {"node": "b", "reason": "Hamming distance 0.7500 to the majority vote, above the cut-off 0.1550"},
        {"node": "e", "reason": "same mask as node b (duplicate)"},
    ]


def test_robust_counts_off_is_count_ones_of_distinct_masks():
    rng = np.random.default_rng(0)
    masks = [np.packbits(rng.random(101) < 0.4, bitorder="little") for _ in range(5)]
    counts, k, info = robust_counts(masks, 101, trim=0, outlier_mads=0)
    ref, k_ref = count_ones(masks, 101)
    assert k == k_ref == 5 and np.array_equal(counts, ref) and info.kept == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        robust_counts([], 101)


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 9), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_weights_all_honest_clients_agree_on_cannot_be_moved(honest, attackers, seed):
    """With at most ``trim`` attackers, fewer than the honest clients, whatever they send, a weight
    that every honest client keeps (or drops) aggregates to exactly 1 (or 0)."""
    attackers = min(attackers, honest - 1)  # trim is capped at (k - 1) // 2
    rng = np.random.default_rng(seed)
    n = 64
    masks = rng.random((honest, n)) < 0.5
    masks[:, :8] = True  # unanimous ones
    masks[:, 8:16] = False  # unanimous zeros
    evil = rng.random((attackers, n)) < rng.random()
    all_masks = [np.packbits(m, bitorder="little") for m in [*masks, *evil]]
    counts, k, _ = robust_counts(all_masks, n, trim=attackers, outlier_mads=0)
    assert (counts[:8] == k).all() and (counts[8:16] == 0).all()
