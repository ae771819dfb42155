"""The metric wrappers compute what the libraries define, with the arguments the right way round."""

import numpy as np
import pytest
import torch

from prism_flwr.evaluation.metrics import FrechetDistance, NearestNeighbours, frechet_distance, prdc_metrics


def test_prdc_hand_computed_example():
    # 1-D features, k = 1. Real points 0..3: every k-NN radius is 1. Fakes 0.5 and 2.5 each lie in
    # two real balls, 100 in none: precision 2/3, density (2 + 2 + 0) / (1 * 3). Fake radii are
    # 2, 2, 97.5, so every real point is in the fake manifold (recall 1), and every real ball holds
    # a fake (coverage 1). Swapping real and fake would give precision 1 and recall 2/3.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [2.5], [100.0]])
    out = prdc_metrics(real, fake, nearest_k=1)
    assert out == pytest.approx({"precision": 2 / 3, "recall": 1.0, "density": 4 / 3, "coverage": 1.0})


def test_prdc_reproduces_the_packages_readme_example():
    # prdc's README: 10k real and 10k fake N(0, I) vectors in 1000 dimensions, k = 5, gives
    # precision 0.4772, recall 0.4705, density 1.0555, coverage 0.9735 "(may fluctuate due to
    # randomness)"; it fixes no seed. Over seeds 0-3 we measured precision 0.46-0.49, recall
    # 0.47-0.50, density 0.86-1.15, coverage 0.95-0.98, hence the tolerances.
    np.random.seed(0)
    real = np.random.normal(loc=0.0, scale=1.0, size=[10000, 1000])
    fake = np.random.normal(loc=0.0, scale=1.0, size=[10000, 1000])
    out = prdc_metrics(torch.from_numpy(real), torch.from_numpy(fake), nearest_k=5)
    assert out["precision"] == pytest.approx(0.4772, abs=0.03)
    assert out["recall"] == pytest.approx(0.4705, abs=0.03)
    assert out["density"] == pytest.approx(1.0555, abs=0.15)
    assert out["coverage"] == pytest.approx(0.9735, abs=0.03)


@pytest.mark.parametrize(
    ("n", "m", "d", "k", "shift"), [(300, 200, 16, 5, 0.0), (200, 300, 64, 3, 0.5), (1100, 1050, 8, 5, 1.0)]
)
def test_prdc_equals_the_prdc_package(n, m, d, k, shift):
    # the package's own computation (scikit-learn's pairwise distances) on the same features; 1100
    # rows cross the block size, so the blocked loop is covered
    prdc = pytest.importorskip("prdc")
    rng = np.random.default_rng(n + d)
    real = rng.standard_normal((n, d)).astype(np.float32)
    fake = (rng.standard_normal((m, d)) * 1.2 + shift).astype(np.float32)
    expected = prdc.compute_prdc(real, fake, nearest_k=k)
    out = prdc_metrics(torch.from_numpy(real), torch.from_numpy(fake), nearest_k=k)
    assert out == pytest.approx({name: float(v) for name, v in expected.items()}, abs=1e-12)


def test_frechet_distance_matches_the_gaussian_closed_form():
    # N(0, I) vs N(m, 4 I) in 4-D: ||m||^2 + sum_i (1 + 4 - 2 * sqrt(1 * 4)) = ||m||^2 + 4.
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([1.0, -2.0, 0.0, 0.5])
    real = torch.randn(40000, 4, generator=g, dtype=torch.float64)
    fake = m + 2.0 * torch.randn(40000, 4, generator=g, dtype=torch.float64)
    assert frechet_distance(real, fake) == pytest.approx(m.pow(2).sum().item() + 4.0, rel=0.02)
    assert abs(frechet_distance(real, real)) < 1e-6


def test_frechet_distance_keeps_the_real_statistics_across_calls():
    g = torch.Generator().manual_seed(1)
    real, fake_a, fake_b = (torch.randn(2000, 8, generator=g) + shift for shift in (0.0, 1.0, 3.0))
    fd = FrechetDistance(real)
    first, second = fd(fake_a), fd(fake_b)
    assert first == pytest.approx(frechet_distance(real, fake_a), rel=1e-9)
    assert second == pytest.approx(frechet_distance(real, fake_b), rel=1e-9)
    assert second > 5 * first  # the second call saw only fake_b, not fake_a and fake_b together


def test_nearest_neighbours_keep_the_real_radii_across_calls():
    # the Evaluator builds one NearestNeighbours per run: each call scores only its own fake set
    g = torch.Generator().manual_seed(2)
    real, fake_a, fake_b = (torch.randn(300, 8, generator=g) + shift for shift in (0.0, 0.5, 3.0))
    knn = NearestNeighbours(real)
    first, second = knn(fake_a), knn(fake_b)
    assert first == prdc_metrics(real, fake_a) and second == prdc_metrics(real, fake_b)
    assert second["precision"] < first["precision"]
