"""Objectives against hand-computed values on tiny inputs."""

import math

import pytest
import torch

from prism_flwr.model.features import build_features
from prism_flwr.model.objectives import FeatureMatching, mmd2_unbiased


def test_mmd2_hand_computed():
    # x = {0, 1}, y = {0, 2}, one bandwidth b = 1: k(a, b) = exp(-(a - b)^2 / 2)
    # xx = e^-0.5, yy = e^-2, mean k(x, y) = (1 + e^-2 + 2 e^-0.5) / 4
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [2.0]])
    expected = math.exp(-0.5) + math.exp(-2) - 2 * (1 + math.exp(-2) + 2 * math.exp(-0.5)) / 4
    assert expected == pytest.approx(-0.43233236, abs=1e-7)
    assert mmd2_unbiased(x, y, (1.0,)).item() == pytest.approx(expected, abs=1e-6)


def test_mmd2_near_zero_for_same_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same = mmd2_unbiased(a, b, (1.0, 4.0)).item()
    shifts = [mmd2_unbiased(a, b + s, (1.0, 4.0)).item() for s in (0.25, 0.5, 1.0)]
    assert abs(same) < 0.005
    assert same < shifts[0] < shifts[1] < shifts[2]


def test_feature_matching_first_step_by_hand():
    # gaps: mu 3-1=2, -1-0=-1; var 0-1=-1, 2-0=2. Adam's first step moves each v entry by
    # lr * sign(gap), so L = lr * (|2| + |-1|) + lr * (|-1| + |2|) = 6 lr.
    fm = FeatureMatching(torch.tensor([3.0, -1.0]), torch.tensor([0.0, 2.0]), lr=1e-5)
    fake = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # mu_f = (1, 0), var_f = (1, 0)
    assert fm(fake).item() == pytest.approx(6e-5, rel=1e-4)
    torch.testing.assert_close(fm.v_mean.detach(), torch.tensor([1e-5, -1e-5]))


def test_feature_matching_moving_averages_follow_torch_adam():
    """The written-out Adam step of the moving averages is torch.optim.Adam's, step for step."""
    torch.manual_seed(0)
    mu, var = torch.randn(6), torch.rand(6)
    fm = FeatureMatching(mu, var, lr=1e-2)
    v_m, v_v = torch.zeros(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    ref = torch.optim.Adam([v_m, v_v], lr=1e-2, betas=(0.5, 0.999))
    for _ in range(5):
        fake = torch.randn(16, 6)
        fm(fake)
        mu_f, var_f = fake.mean(0), fake.var(0, unbiased=False)
        ref.zero_grad()
        ((v_m - (mu - mu_f)).pow(2).mean() + (v_v - (var - var_f)).pow(2).mean()).backward()
        ref.step()
    torch.testing.assert_close(fm.v_mean, v_m.detach())
    torch.testing.assert_close(fm.v_var, v_v.detach())


def test_feature_matching_state_round_trip():
    fm = FeatureMatching(torch.randn(4), torch.rand(4))
    for _ in range(3):
        fm(torch.randn(8, 4))
    again = FeatureMatching.from_state(fm.full_state())
    x = torch.randn(8, 4)
    assert fm(x).item() == pytest.approx(again(x).item(), rel=1e-6)


def test_vgg19_without_weights_names_the_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        build_features("vgg19", str(tmp_path / "vgg.pth"))
    msg = str(err.value)
    assert str(tmp_path / "vgg.pth") in msg and "vgg19-dcbb9e9d.pth" in msg and "vgg19-weights" in msg


def test_vgg19_features_from_a_local_file(tmp_path):
    from torchvision.models import vgg19

    path = tmp_path / "vgg.pth"
    torch.save(vgg19(weights=None).state_dict(), path)
    feats = build_features("vgg19", str(path))
    out = feats(torch.rand(2, 1, 32, 32) * 2 - 1)
    # 16 ReLUs: 2x64x32x32 + 2x128x16x16 + 4x256x8x8 + 4x512x4x4 + 4x512x2x2
    assert out.shape == (2, 303_104)
