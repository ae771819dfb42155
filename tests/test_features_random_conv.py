"""The random-conv feature map: a fixed seeded random conv net, no pretrained weights."""

from __future__ import annotations

import torch

from prism_flwr.model.features import RandomConvFeatures, build_features


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
