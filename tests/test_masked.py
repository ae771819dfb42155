"""Masked layers and the generator: W * m, gradient path, bit-identical rebuilds."""

import pytest
import torch

from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import (
    MaskedLinear,
    get_flat,
    get_scores,
    layout_fingerprint,
    make_dense,
    masked_layers,
    num_masked,
    sample_mask,
    set_flat,
    set_mask_mode,
    set_scores,
)


def _linear(seed=0):
    return MaskedLinear(
        5,
        3,
        weight_gen=torch.Generator().manual_seed(seed),
        score_gen=torch.Generator().manual_seed(seed + 1),
    )


def test_weights_are_signed_kaiming_constant_buffers():
    layer = _linear()
    assert "weight" not in dict(layer.named_parameters())
    values = layer.weight.abs().unique().tolist()
    assert values == [pytest.approx((2 / 5) ** 0.5)]
    assert (layer.weight > 0).any() and (layer.weight < 0).any()
    assert [n for n, _ in layer.named_parameters()] == ["scores"]


def test_threshold_forward_is_w_times_mask():
    layer = _linear()
    set_mask_mode(layer, "threshold")
    x = torch.randn(4, 5)
    expected = x @ (layer.weight * (layer.scores > 0).float()).T
    torch.testing.assert_close(layer(x), expected)


def test_sample_forward_uses_a_bernoulli_mask_of_theta():
    layer = _linear()
    x = torch.randn(4, 5)
    torch.manual_seed(11)
    out = layer(x)
    torch.manual_seed(11)
    m = torch.bernoulli(torch.sigmoid(layer.scores.detach()))
    torch.testing.assert_close(out, x @ (layer.weight * m).T)


@pytest.mark.parametrize("estimator", ["scaled", "identity"])
def test_gradient_reaches_scores_through_the_estimator(estimator):
    layer = _linear()
    set_mask_mode(layer, "sample", estimator)
    x = torch.randn(4, 5)
    layer(x).sum().backward()
    theta = torch.sigmoid(layer.scores.detach())
    dl_dm = x.sum(0).expand(3, 5) * layer.weight  # d sum(x (W*m)^T) / dm
    dl_dtheta = dl_dm * theta if estimator == "scaled" else dl_dm
    torch.testing.assert_close(layer.scores.grad, dl_dtheta * theta * (1 - theta))
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_same_seed_is_bit_identical_and_other_seeds_differ():
    a, b = ResnetGenerator(GeneratorSpec(ngf=4, seed=5)), ResnetGenerator(GeneratorSpec(ngf=4, seed=5))
    c = ResnetGenerator(GeneratorSpec(ngf=4, seed=6))
    for la, lb, lc in zip(masked_layers(a), masked_layers(b), masked_layers(c)):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.scores, lb.scores)
        assert not torch.equal(la.weight, lc.weight)


def test_paper_generator_size_and_layout():
    g = ResnetGenerator(GeneratorSpec(ngf=64, nc=1))
    assert num_masked(g) == 3_543_616  # the paper's "about 3.55 M"
    assert g(torch.randn(2, 128)).shape == (2, 1, 32, 32)
    g3 = ResnetGenerator(GeneratorSpec(ngf=8, nc=3))
    assert g3(torch.randn(2, 128)).shape == (2, 3, 32, 32)
    assert layout_fingerprint(g) != layout_fingerprint(ResnetGenerator(GeneratorSpec(ngf=64, nc=3)))
    assert layout_fingerprint(g) == layout_fingerprint(ResnetGenerator(GeneratorSpec(ngf=64, nc=1, seed=1)))


def test_flat_scores_round_trip_and_masks():
    g = ResnetGenerator(GeneratorSpec(ngf=4))
    flat = torch.randn(num_masked(g))
    set_scores(g, flat)
    assert torch.equal(get_scores(g), flat)
    assert torch.equal(get_scores(g) > 0, flat > 0)
    set_scores(g, torch.full((num_masked(g),), 50.0))
    assert sample_mask(g).all()
    with pytest.raises(ValueError, match="masked weights"):
        set_scores(g, flat[:-1])


def test_make_dense_trains_the_weights_of_the_same_network():
    g = ResnetGenerator(GeneratorSpec(ngf=4, seed=2))
    before = get_flat(g, "weight")
    make_dense(g)
    assert torch.equal(get_flat(g, "weight"), before)  # same frozen init, now trainable
    assert all(p.requires_grad for n, p in g.named_parameters() if n.endswith("weight"))
    assert not any(p.requires_grad for n, p in g.named_parameters() if n.endswith("scores"))
    g(torch.randn(4, 128)).sum().backward()
    assert all(m.weight.grad is not None and m.scores.grad is None for m in masked_layers(g))
    set_flat(g, torch.zeros_like(before), "weight")
    assert torch.equal(g(torch.randn(2, 128)), torch.zeros(2, 1, 32, 32))  # tanh(0): W unmasked and used
