"""Aggregation math on a hand-computed 2-client x 8-weight case."""

import numpy as np
import pytest

from prism_flwr.federated.aggregation import (
    aggregate,
    count_ones,
    hamming_lambda,
    logit,
    mada_blend,
    smoothed_mean,
)

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
    np.testing.assert_allclose(
        out, [2.29063, 1.29859, -2.29063, -1.29859, 2.29063, -1.29859, 1.29859, -2.29063], atol=1e-4
    )


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


# --- lambda diagnostics and the rules beyond the paper, each against numbers worked by hand ---

from prism_flwr.federated.aggregation import Aggregator, change_lambda, lambda_diagnostics, sigmoid  # noqa: E402


def test_lambda_diagnostics_by_hand():
    d = lambda_diagnostics(np.array([0.5, 0.9], np.float32), np.array([0.5, 0.1], np.float32))
    assert d["lambda_no_change"] == pytest.approx((0.5 + 0.18) / 2)  # mean 2 t (1 - t)
    assert d["theta_change_sq"] == pytest.approx((0.0 + 0.64) / 2)  # mean (t_o - t_agg)^2


def test_mada_lambda_expectation_is_change_plus_noise():
    """E[Hamming] = mean (t_o - t_n)^2 + t_o (1 - t_o) + t_n (1 - t_n): the identity the
    diagnostics rest on, checked by sampling."""
    rng = np.random.default_rng(0)
    t_o = rng.uniform(0.05, 0.95, 200_000).astype(np.float32)
    t_n = rng.uniform(0.05, 0.95, 200_000).astype(np.float32)
    expected = np.mean((t_o - t_n) ** 2 + t_o * (1 - t_o) + t_n * (1 - t_n))
    assert hamming_lambda(t_o, t_n, rng) == pytest.approx(expected, abs=3e-3)


def test_change_lambda_by_hand():
    # K = 5 votes, counts (0, 1): raw vote fractions p = (0, 0.2), theta_agg = 0.01 + 0.98 p.
    # sigma^2 = 0.98^2 * mean(p (1 - p)) / (K - 1) = 0.9604 * 0.08 / 4 = 0.019208
    # D = mean((0.9 - 0.01)^2, (0.9 - 0.206)^2) = (0.7921 + 0.481636) / 2 = 0.636868
    theta_agg = smoothed_mean(np.array([0, 1]), 5)
    lam = change_lambda(np.array([0.9, 0.9], np.float32), theta_agg, 5)
    assert lam == pytest.approx(1 - 0.019208 / 0.636868, rel=1e-5)
    # Votes that only scatter around the old theta: the noise explains all the change -> 0.
    assert change_lambda(np.array([0.7, 0.7], np.float32), smoothed_mean(np.array([2, 3]), 5), 5) == 0.0
    # Unanimous votes carry no noise: the full step.
    assert change_lambda(np.array([0.5, 0.5], np.float32), smoothed_mean(np.array([4, 0]), 4), 4) == 1.0
    assert change_lambda(np.array([0.5], np.float32), smoothed_mean(np.array([1]), 1), 1) == 1.0


def test_mada_change_blends_with_its_gain():
    scores = np.array([2.0, 2.0], np.float32)
    res = Aggregator("mada-change").step(scores, np.array([0, 1]), 5, rng=np.random.default_rng(0))
    lam = change_lambda(sigmoid(scores), smoothed_mean(np.array([0, 1]), 5), 5)
    assert res.mada_lambda == pytest.approx(lam)
    np.testing.assert_allclose(
        res.scores, lam * logit(smoothed_mean(np.array([0, 1]), 5)) + (1 - lam) * scores, rtol=1e-6
    )
    assert set(res.diagnostics) == {"lambda_no_change", "theta_change_sq"}


def test_server_adam_first_two_steps_by_hand():
    agg = Aggregator("adam")
    s0 = np.array([0.0, 1.0], np.float32)
    counts, k = np.array([1, 0]), 1  # theta_agg = (0.99, 0.01)
    target = np.log(99.0) * np.array([1.0, -1.0])  # logit(0.99) = 4.59512
    d = target - s0  # (4.59512, -5.59512)
    s1 = agg.step(s0, counts, k, rng=np.random.default_rng(0)).scores
    # m = 0.1 d, v = 0.01 d^2: the step is 0.1 d / (0.1 |d| + 1e-3), about one unit per weight
    np.testing.assert_allclose(s1, s0 + 0.1 * d / (0.1 * np.abs(d) + 1e-3), rtol=1e-5)
    d2 = target - s1
    m = 0.9 * 0.1 * d + 0.1 * d2
    v = 0.99 * 0.01 * d * d + 0.01 * d2 * d2
    s2 = agg.step(s1, counts, k, rng=np.random.default_rng(0)).scores
    np.testing.assert_allclose(s2, s1 + m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    restored = Aggregator("adam")
    restored.load_state_dict(agg.state_dict())
    np.testing.assert_array_equal(
        restored.step(s2, counts, k, rng=np.random.default_rng(0)).scores,
        agg.step(s2, counts, k, rng=np.random.default_rng(0)).scores,
    )


def test_beta_posterior_with_forgetting_by_hand():
    agg = Aggregator("beta")
    s = np.zeros(2, np.float32)
    # round 1: a = 0.5 * 1 + (3, 0) = (3.5, 0.5), b = 0.5 * 1 + (0, 3) = (0.5, 3.5)
    r1 = agg.step(s, np.array([3, 0]), 3, rng=np.random.default_rng(0))
    np.testing.assert_allclose(sigmoid(r1.scores), [0.875, 0.125], rtol=1e-5)
    # round 2, no ones: a = (1.75, 0.25), b = (0.25 + 3, 1.75 + 3) -> theta = (1.75 / 5, 0.25 / 5)
    r2 = agg.step(r1.scores, np.array([0, 0]), 3, rng=np.random.default_rng(0))
    np.testing.assert_allclose(sigmoid(r2.scores), [0.35, 0.05], rtol=1e-5)


def test_aggregator_refuses_an_unknown_rule():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        Aggregator("median")


# --- mada-change's noise estimate against a Monte-Carlo truth ---

from prism_flwr.federated.aggregation import EPS, vote_noise  # noqa: E402


def _noise_by_sampling(q: np.ndarray, rounds: int, rng: np.random.Generator) -> tuple[float, float]:
    """(Monte-Carlo variance of theta_agg per weight, mean of vote_noise) for clients voting
    with probabilities ``q`` (clients x weights), over ``rounds`` independent rounds."""
    k = q.shape[0]
    thetas, estimates = [], []
    for _ in range(rounds):
        theta = smoothed_mean((rng.random(q.shape) < q).sum(0), k)
        thetas.append(theta.astype(np.float64))
        estimates.append(vote_noise(theta, k))
    return float(np.mean(np.var(thetas, axis=0, ddof=1))), float(np.mean(estimates))


def test_vote_noise_is_unbiased_for_clients_that_share_theta():
    rng = np.random.default_rng(0)
    q = np.repeat(rng.beta(0.5, 0.5, (1, 2000)), 4, axis=0)
    truth, estimate = _noise_by_sampling(q, 300, rng)
    assert estimate == pytest.approx(truth, rel=0.03)


def test_vote_noise_with_heterogeneous_clients_is_too_large_by_their_disagreement():
    """4 clients with their own theta: the estimate is the truth plus (1 - 2 eps)^2 s_q^2 / (K - 1),
    as the module docstring says; far from unbiased."""
    rng = np.random.default_rng(1)
    q = rng.beta(0.5, 0.5, (4, 2000))
    truth, estimate = _noise_by_sampling(q, 300, rng)
    scale = (1 - 2 * EPS) ** 2
    assert truth == pytest.approx(scale * np.mean(q * (1 - q)) / 4, rel=0.03)
    assert estimate == pytest.approx(truth + scale * np.mean(q.var(axis=0)) / 3, rel=0.03)
    assert estimate > 1.5 * truth


def test_vote_noise_is_unbiased_for_clients_sampled_from_a_population():
    """Each round 4 clients drawn at random from 40 heterogeneous ones take part: the noise
    around the population's mean vote (the target then) is what vote_noise estimates."""
    rng = np.random.default_rng(2)
    population = rng.beta(0.5, 0.5, (40, 1000))
    thetas, estimates = [], []
    for _ in range(400):
        q = population[rng.integers(0, 40, 4)]
        theta = smoothed_mean((rng.random(q.shape) < q).sum(0), 4).astype(np.float64)
        thetas.append(theta)
        estimates.append(vote_noise(theta, 4))
    mean_vote = EPS + (1 - 2 * EPS) * population.mean(0)
    truth = float(np.mean((np.array(thetas) - mean_vote) ** 2))
    assert float(np.mean(estimates)) == pytest.approx(truth, rel=0.05)
    assert np.isnan(vote_noise(smoothed_mean(np.array([1]), 1), 1))  # one vote: no estimate
