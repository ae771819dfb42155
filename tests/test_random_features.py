"""Median-rule kernel widths and the random-conv feature map (no pretrained weights)."""

from __future__ import annotations

import pytest
import torch

from prism_flwr import objectives
from prism_flwr.features import RandomConvFeatures, build_features
from prism_flwr.objectives import median_distance, mmd2_unbiased


def _pair(seed: int = 0, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 1024, generator=g), torch.randn(64, 1024, generator=g) + shift


def test_median_rule_is_the_explicit_widths_of_the_pooled_median() -> None:
    x, y = _pair(shift=0.3)
    z = torch.cat([x, y])
    med = median_distance(torch.cdist(z, z).pow(2))
    explicit = mmd2_unbiased(x, y, tuple(f * med for f in objectives.MMD_BANDWIDTHS))
    assert mmd2_unbiased(x, y).item() == pytest.approx(explicit.item(), rel=1e-5)


def test_median_rule_is_scale_free_where_fixed_widths_are_not() -> None:
    x, y = _pair(shift=0.3)
    for c in (0.01, 100.0):
        assert mmd2_unbiased(c * x, c * y).item() == pytest.approx(mmd2_unbiased(x, y).item(), rel=1e-4)
    fixed = (10.0, 20.0)
    assert mmd2_unbiased(100 * x, 100 * y, fixed).item() == pytest.approx(0.0, abs=1e-6)  # kernels vanish


def test_median_rule_separates_distributions() -> None:
    same = abs(mmd2_unbiased(*_pair(1)).item())
    apart = mmd2_unbiased(*_pair(1, shift=0.5)).item()
    assert apart > 10 * same, (same, apart)


def test_random_conv_is_fixed_seeded_frozen_and_differentiable() -> None:
    a, b = build_features("random-conv"), build_features("random-conv")
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(a(x), b(x))  # the same map on every client and every run
    assert a(x).shape == (4, 1024 + 32 * 16 * 16 + 64 * 8 * 8 + 128 * 4 * 4)
    assert a(torch.zeros(2, 3, 32, 32)).shape == (2, 3072 + 32 * 16 * 16 + 64 * 8 * 8 + 128 * 4 * 4)
    assert not any(p.requires_grad for p in a.parameters())
    x.requires_grad_(True)
    a(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator gets a gradient through it
    # grey input runs through the colour network as three equal channels
    assert torch.equal(a(x.detach())[:, 1024:], a(x.detach().expand(-1, 3, -1, -1))[:, 3072:])
    # another seed is another map
    assert not torch.equal(RandomConvFeatures(seed=1)(x.detach()), a(x.detach()))
