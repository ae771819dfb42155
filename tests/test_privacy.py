"""Tests for prism_flwr.privacy: the theta and statistics mechanisms and the RDP accountant."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from prism_flwr import privacy as P

# ------------------------------------------------------------------ calibration


def test_theta_sensitivity():
    assert P.theta_sensitivity(1_000_000, 0.1) == pytest.approx(800.0)
    assert P.theta_sensitivity(100, 0.25) == pytest.approx(5.0)
    assert P.theta_sensitivity(4, 0.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        P.theta_sensitivity(0, 0.1)
    with pytest.raises(ValueError):
        P.theta_sensitivity(10, 0.5)


# --------------------------------------------------------------- theta mechanism


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_privatize_theta_noise_std_matches_calibration():
    n, c = 250_000, 0.1
    z = 2.5e-5  # sigma = z * 0.8 * 500 = 0.01: far from the clamps, so noise is visible
    theta = torch.full((500, 500), 0.5)
    (out,) = P.privatize_theta([theta], c, z, generator=_gen(1))
    expected = z * (1 - 2 * c) * math.sqrt(n)
    assert expected == pytest.approx(0.01)
    noise = out - 0.5
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(n)


def test_privatize_theta_output_in_range_and_clamps_before_noise():
    c = 0.1
    theta = torch.rand(10_000, generator=_gen(3))
    theta[:10] = torch.tensor([0.0, 1.0, -3.0, 4.0, 0.05, 0.95, 0.1, 0.9, 0.5, 0.3])
    original = theta.clone()
    (out,) = P.privatize_theta([theta], c, 1.0, generator=_gen(4))  # sigma = 80
    assert out.shape == theta.shape and out.dtype == theta.dtype
    assert torch.equal(theta, original)  # input untouched
    assert out.min().item() >= c and out.max().item() <= 1 - c
    # With huge noise every output is at a clamp, about half on each side.
    frac_hi = (out == 1 - c).float().mean().item()
    assert 0.45 < frac_hi < 0.55
    # Clamp BEFORE noise: theta = 0 becomes c, then small symmetric noise puts about
    # half of the outputs strictly above c (clamping only after would give ~0 above c).
    zeros = torch.zeros(100_000)
    z_small = 0.001 / (0.8 * math.sqrt(100_000))  # sigma = 0.001
    (out0,) = P.privatize_theta([zeros], c, z_small, generator=_gen(5))
    frac_above = (out0 > c).float().mean().item()
    assert 0.45 < frac_above < 0.55
    assert out0.max().item() < c + 0.01


def test_privatize_theta_deterministic_with_generator_and_validates():
    thetas = [torch.rand(3, 4, generator=_gen(6)), torch.rand(5, generator=_gen(7))]
    a = P.privatize_theta(thetas, 0.1, 0.01, generator=_gen(8))
    b = P.privatize_theta(thetas, 0.1, 0.01, generator=_gen(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError):
        P.privatize_theta(thetas, 0.1, 0.0)
    with pytest.raises(ValueError):
        P.privatize_theta(thetas, 0.6, 1.0)


def test_privatize_theta_one_sigma_over_all_tensors():
    """One mechanism on the concatenation: every tensor gets sigma = z (1 - 2c) sqrt(N), N = all weights."""
    c, z = 0.1, 1e-5
    outs = P.privatize_theta(
        [torch.full((200, 200), 0.5), torch.full((400, 400), 0.5)], c, z, generator=_gen(2)
    )
    for out in outs:
        assert (out - 0.5).std().item() == pytest.approx(z * 0.8 * math.sqrt(200_000), rel=0.03)


# ------------------------------------------------------------------- accounting


@pytest.mark.parametrize("epsilon,rounds", [(9.8, 20), (1.0, 5), (3.0, 1)])
def test_noise_multiplier_reaches_budget_with_opacus_rdp(epsilon, rounds):
    from opacus.accountants import RDPAccountant

    delta = 1e-5
    z = P.noise_multiplier_for_budget(epsilon, delta, rounds)
    acc = RDPAccountant()  # independent check with Opacus' own default orders
    for _ in range(rounds):
        acc.step(noise_multiplier=z, sample_rate=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = acc.get_epsilon(delta)
    assert eps == pytest.approx(epsilon, rel=0.01)
    # ours never exceeds the target and is within 1e-5 of it
    ours = P.compute_epsilon(z, delta, rounds)
    assert epsilon * (1 - 1e-5) <= ours <= epsilon
    # more rounds need more noise (sqrt(R) scaling at sample rate 1)
    z2 = P.noise_multiplier_for_budget(epsilon, delta, 4 * rounds)
    assert z2 == pytest.approx(2 * z, rel=1e-4)


def test_noise_multiplier_close_to_opacus_get_noise_multiplier():
    from opacus.accountants.utils import get_noise_multiplier

    z_op = get_noise_multiplier(
        target_epsilon=9.8, target_delta=1e-5, sample_rate=1.0, steps=50, accountant="rdp"
    )
    z = P.noise_multiplier_for_budget(9.8, 1e-5, 50)
    assert z == pytest.approx(z_op, rel=0.01)


def test_a_runs_releases_stop_at_its_budget(tmp_path):
    """The run budget (dp-epsilon over num-server-rounds) in the node's ledger: each release spends
    more, the last fits exactly, one more is refused; the tolerance is floating-point only."""
    from prism_flwr.privacy.ledger import ExampleSet, LedgerError, LedgerSession, PrivacyLedger

    delta, budget, rounds = 1e-5, 2.0, 5
    z = P.noise_multiplier_for_budget(budget, delta, rounds)
    ledger, data = PrivacyLedger(tmp_path, 100.0, delta), ExampleSet.of([1, 2, 3])
    seen = []
    for rnd in range(1, rounds + 1):
        with LedgerSession(ledger, "aaaa0001", rnd, data).theta_release(z, budget):
            pass
        seen.append(LedgerSession(ledger, "aaaa0001", rnd, data).run_epsilon())
    assert all(b > a for a, b in zip(seen, seen[1:]))
    assert seen[-1] == pytest.approx(budget, rel=1e-4) and seen[-1] <= budget
    with pytest.raises(LedgerError, match="run's privacy budget"):
        LedgerSession(ledger, "aaaa0001", rounds + 1, data).precheck(z, budget)
    one = P.compute_epsilon(z, delta, 1)
    with pytest.raises(LedgerError, match="run's privacy budget"):
        LedgerSession(ledger, "bbbb0002", 1, data).precheck(z, one * (1 - 1e-3))
    LedgerSession(ledger, "bbbb0002", 1, data).precheck(z, one)


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Reference only: the tight (epsilon, delta) of mu-GDP (Dong, Roth & Su 2019, Cor. 2.13)."""
    from scipy.optimize import brentq
    from scipy.special import log_ndtr, ndtr

    def gap(eps: float) -> float:
        return float(ndtr(-eps / mu + mu / 2) - math.exp(eps + log_ndtr(-eps / mu - mu / 2))) - delta

    return float(brentq(gap, 0.0, 1e4, xtol=1e-12))


@pytest.mark.parametrize("z,steps", [(1.0, 1), (4.0, 20), (12.0, 500)])
def test_rdp_epsilon_is_a_valid_and_not_too_loose_bound(z, steps):
    """R Gaussian releases with multiplier z are exactly sqrt(R)/z-GDP: the RDP figure must never be
    below that exact epsilon (it would understate the spend) and stays within a few tens of per cent."""
    exact = _analytic_gaussian_epsilon(math.sqrt(steps) / z, 1e-5)
    rdp = P.compute_epsilon(z, 1e-5, steps)
    assert exact <= rdp <= 1.3 * exact
    if (z, steps) == (1.0, 1):
        assert exact == pytest.approx(4.3772, abs=1e-3)  # the known figure for one release at z = 1


def test_releases_of_different_multipliers_compose_in_rdp():
    """The node's ledger mixes runs: composition equals the same releases counted one by one, is
    below the sum of the runs' epsilons (basic composition) and grows with every release."""
    delta = 1e-5
    a, b = P.noise_multiplier_for_budget(5.0, delta, 3), P.noise_multiplier_for_budget(2.0, delta, 1)
    both = P.epsilon_of_releases([a, a, a, b], delta)
    assert P.epsilon_of_releases([a, b, a, a], delta) == both
    assert max(P.compute_epsilon(a, delta, 3), P.compute_epsilon(b, delta, 1)) < both < 5.0 + 2.0
    assert P.epsilon_of_releases([a, a, a], delta) == pytest.approx(P.compute_epsilon(a, delta, 3))
    assert P.epsilon_of_releases([], delta) == 0.0
    with pytest.raises(ValueError):
        P.epsilon_of_releases([0.0], delta)


# -------------------------------------------------------------- statistics mode


def test_statistics_epsilon_equals_target_and_is_a_single_release():
    torch.manual_seed(0)
    feats = torch.randn(300, 16)
    mu, var, spent = P.privatize_statistics(feats, 2.0, 1.0, 1e-5, generator=_gen(9))
    assert 1.0 * (1 - 1e-5) <= spent <= 1.0
    assert mu.shape == (16,) and var.shape == (16,) and mu.dtype == torch.float32
    assert (var >= 0).all()
    # The spend is that of ONE Gaussian mechanism: it does not depend on n, d, or on
    # how the released (mu, var) are used afterwards (the function is called once per
    # client; rounds and local steps only read mu/var: post-processing).
    z = P.noise_multiplier_for_budget(1.0, 1e-5, 1)
    assert spent == pytest.approx(P.compute_epsilon(z, 1e-5, 1), rel=1e-12)
    _, _, spent_big = P.privatize_statistics(torch.randn(2000, 64), 2.0, 1.0, 1e-5)
    assert spent_big == pytest.approx(spent, rel=1e-12)
    losses = [float(((mu - feats[i]) ** 2).sum() + var.sum()) for i in range(100)]
    assert len(losses) == 100  # using mu/var again changes nothing about `spent`
    _, _, spent9 = P.privatize_statistics(feats, 2.0, 9.8, 1e-5)
    assert spent9 == pytest.approx(9.8, rel=1e-5)


def test_statistics_clipping_bounds_each_sample():
    torch.manual_seed(1)
    C = 1.5
    feats = torch.randn(200, 10)
    outlier = torch.full((1, 10), 1e6)
    s1, s2, n = P.clipped_feature_sums(feats, C)
    t1, t2, m = P.clipped_feature_sums(torch.cat([feats, outlier]), C)
    assert m == n + 1
    assert (t1 - s1).norm().item() == pytest.approx(C, rel=1e-9)  # clipped to exactly C
    assert (t2 - s2).norm().item() <= C**2 * (1 + 1e-9)
    # every row's clipped norm is <= C
    small = torch.randn(50, 10) * 0.01
    u1, _, _ = P.clipped_feature_sums(small, C)
    assert torch.allclose(u1, small.double().sum(0))  # rows under C are untouched
    # The released vector [S1, S2, w n] moves by at most the sensitivity when one sample is added.
    w = math.sqrt(C * math.sqrt(C**2 + C**4) / math.sqrt(10))
    moved = torch.cat([t1 - s1, t2 - s2, torch.tensor([w * (m - n)], dtype=torch.float64)]).norm().item()
    assert moved <= P.statistics_sensitivity(C, 10) * (1 + 1e-9)


def test_statistics_noise_std_matches_sensitivity():
    n, d, C, eps, delta = 4000, 2000, 1.0, 1.0, 1e-5
    feats = torch.zeros(n, d)
    mu, _, _ = P.privatize_statistics(feats, C, eps, delta, _gen(11))
    z = P.noise_multiplier_for_budget(eps, delta, 1)
    sens = P.statistics_sensitivity(C, d)
    w2 = C * math.sqrt(C**2 + C**4) / math.sqrt(d)
    assert sens == pytest.approx(math.sqrt(C**2 + C**4 + w2))
    assert (mu.double() * n).std().item() == pytest.approx(z * sens, rel=0.06)


def test_statistics_add_remove_noises_the_count_exactly_as_documented():
    # Reconstruct the release from the same generator: [S1 + e1, S2 + e2, w n + e0].
    torch.manual_seed(3)
    n, d, C, eps, delta = 30, 5, 1.0, 2.0, 1e-5
    feats = torch.randn(n, d) * 0.3
    mu, var, _ = P.privatize_statistics(feats, C, eps, delta, _gen(13))
    s1, s2, _ = P.clipped_feature_sums(feats, C)
    w = math.sqrt(C * math.sqrt(C**2 + C**4) / math.sqrt(d))
    sigma = P.noise_multiplier_for_budget(eps, delta, 1) * math.sqrt(C**2 + C**4 + w**2)
    e = torch.randn(2 * d + 1, generator=_gen(13), dtype=torch.float64) * sigma
    n_noisy = max(n + float(e[2 * d]) / w, 1.0)
    assert abs(n_noisy - n) > 1e-3  # the count really is noised
    mu_ref = (s1 + e[:d]) / n_noisy
    var_ref = torch.clamp((s2 + e[d : 2 * d]) / n_noisy - mu_ref**2, min=0.0)
    assert torch.allclose(mu.double(), mu_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(var.double(), var_ref, rtol=1e-5, atol=1e-6)


def test_statistics_accurate_for_large_n_and_small_noise():
    torch.manual_seed(2)
    n, d = 20_000, 8
    mean = torch.linspace(-0.5, 0.5, d)
    std = torch.linspace(0.1, 0.3, d)
    feats = mean + std * torch.randn(n, d)
    assert feats.norm(dim=1).max() < 5.0  # C = 5: no clipping bias
    mu, var, spent = P.privatize_statistics(feats, 5.0, 10.0, 1e-5, _gen(12))
    assert spent == pytest.approx(10.0, rel=1e-5)
    assert torch.allclose(mu, feats.mean(0), atol=5e-3)
    assert torch.allclose(var, feats.var(0, unbiased=False), atol=5e-3)
    assert torch.allclose(var, std**2, atol=1e-2)


def test_statistics_from_batches_equal_the_whole_matrix():
    """Clipping is per sample, so feeding the partition in batches releases the same thing."""
    feats = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * 3
    whole = P.privatize_statistics(feats, 2.0, 5.0, 1e-5, generator=torch.Generator().manual_seed(1))
    parts = P.privatize_statistics(
        feats.split(64), 2.0, 5.0, 1e-5, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(whole[0], parts[0])
    torch.testing.assert_close(whole[1], parts[1])
    assert whole[2] == parts[2]


def test_noise_is_fresh_per_release_unless_a_test_passes_a_generator():
    """Without a generator, no seed the run knows (torch's global one included) fixes the noise."""
    thetas = [torch.full((2000,), 0.5)]
    feats = torch.randn(50, 8)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        outs.append(
            (P.privatize_theta(thetas, 0.1, 0.01)[0], P.privatize_statistics(feats, 2.0, 1.0, 1e-5)[0])
        )
    assert not torch.equal(outs[0][0], outs[1][0]) and not torch.equal(outs[0][1], outs[1][1])
    g = P.fresh_generator()
    assert isinstance(g, torch.Generator) and g.initial_seed() != P.fresh_generator().initial_seed()
