"""Aggregation math on a hand-computed 2-client x 8-weight case."""

import numpy as np
import pytest

from prism_flwr.aggregation import (aggregate, count_ones, hamming_lambda, logit, mada_blend,
                                    smoothed_mean)

C1 = np.array([1, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
C2 = np.array([1, 0, 0, 1, 1, 1, 0, 0], dtype=bool)
S_T = np.array([2, 2, -2, -2, 2, -2, 2, -2], dtype=np.float32)
# eps = 0.01: 0.01 + 0.98 * count / 2
THETA_AGG = [0.99, 0.5, 0.01, 0.5, 0.99, 0.5, 0.5, 0.01]
LN99 = 4.59511985  # logit(0.99) = ln 99


def packed(*masks):
    return [np.packbits(m, bitorder="little") for m in masks]


def test_count_ones_on_packed_bits():
    counts, k = count_ones(packed(C1, C2), 8)
    assert k == 2
    assert counts.tolist() == [2, 1, 0, 1, 2, 1, 1, 0]


def test_smoothed_mean_and_logit():
    counts, k = count_ones(packed(C1, C2), 8)
    theta = smoothed_mean(counts, k)
    np.testing.assert_allclose(theta, THETA_AGG, rtol=1e-6)
    np.testing.assert_allclose(logit(theta), [LN99, 0, -LN99, 0, LN99, 0, 0, -LN99], atol=1e-5)


def test_plain_mean_is_logit_of_smoothed_mean():
    counts, k = count_ones(packed(C1, C2), 8)
    res = aggregate(S_T, counts, k, method="mean", rng=np.random.default_rng(0))
    np.testing.assert_allclose(res.scores, [LN99, 0, -LN99, 0, LN99, 0, 0, -LN99], atol=1e-5)
    assert np.isnan(res.mada_lambda)


def test_mada_blend_score_space_by_hand():
    # s_{t+1} = 0.25 * logit(theta_agg) + 0.75 * s_t
    out = mada_blend(S_T, np.array(THETA_AGG, np.float32), 0.25, "score")
    np.testing.assert_allclose(out, [2.64878, 1.5, -2.64878, -1.5, 2.64878, -1.5, 1.5, -2.64878], atol=1e-4)


def test_mada_blend_probability_space_by_hand():
    # theta_{t+1} = 0.75 * sigmoid(s_t) + 0.25 * theta_agg, then logit
    out = mada_blend(S_T, np.array(THETA_AGG, np.float32), 0.25, "probability")
    np.testing.assert_allclose(out, [2.29063, 1.29859, -2.29063, -1.29859, 2.29063, -1.29859, 1.29859, -2.29063], atol=1e-4)


def test_hamming_lambda_is_the_fraction_of_differing_bits():
    # theta of exactly 0 or 1 makes the samples deterministic: 3 of 8 positions differ.
    old = np.array([1, 1, 0, 0, 1, 0, 1, 0], np.float32)
    new = np.array([1, 0, 0, 1, 1, 1, 1, 0], np.float32)
    assert hamming_lambda(old, new, np.random.default_rng(123)) == pytest.approx(3 / 8)


def test_hamming_lambda_expectation():
    rng = np.random.default_rng(1)
    old = rng.random(200_000, dtype=np.float32)
    new = rng.random(200_000, dtype=np.float32)
    expected = float(np.mean(old * (1 - new) + new * (1 - old)))
    assert hamming_lambda(old, new, np.random.default_rng(2)) == pytest.approx(expected, abs=3e-3)


def test_mada_uses_its_lambda_and_is_reproducible():
    counts, k = count_ones(packed(C1, C2), 8)
    a = aggregate(S_T, counts, k, method="mada", rng=np.random.default_rng(7))
    b = aggregate(S_T, counts, k, method="mada", rng=np.random.default_rng(7))
    assert a.mada_lambda == b.mada_lambda and 0.0 <= a.mada_lambda <= 1.0
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_allclose(a.scores, mada_blend(S_T, smoothed_mean(counts, k), a.mada_lambda), atol=1e-6)


def test_mada_lambda_is_small_when_clients_agree_with_the_model():
    # Saturated global scores and unanimous clients agreeing with them: the only disagreement left
    # is the eps smoothing (theta_agg = 0.99 / 0.01), so lambda is about 0.01 and the model barely moves.
    bits = np.random.default_rng(3).random(20_000) < 0.5
    s = np.where(bits, 30.0, -30.0).astype(np.float32)
    counts, k = count_ones(packed(bits, bits), bits.size)
    res = aggregate(s, counts, k, method="mada", rng=np.random.default_rng(0))
    assert res.mada_lambda == pytest.approx(0.01, abs=0.003)


def test_bad_arguments():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate(S_T, np.zeros(8, np.uint32), 1, method="median", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="zero masks"):
        smoothed_mean(np.zeros(8, np.uint32), 0)


def test_count_ones_past_the_uint8_block():
    # 600 masks: the uint8 block is flushed twice; counts must still be exact.
    rng = np.random.default_rng(4)
    masks = rng.random((600, 13)) < 0.7
    counts, k = count_ones((np.packbits(m, bitorder="little") for m in masks), 13)
    assert k == 600
    np.testing.assert_array_equal(counts, masks.sum(0))
