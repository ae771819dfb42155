"""The head and the image layer as matmuls: the same numbers and gradients as torch's convolutions."""

import pytest
import torch
import torch.nn.functional as F

from prism_flwr.model.matmul_conv import head_conv, narrow_conv3x3, narrow_pays


def _outputs_and_grads(fn, x, w, seed):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return (y, *torch.autograd.grad(y, (x, w), g))


@pytest.mark.parametrize(("c", "o", "k"), [(128, 128, 4), (7, 5, 4), (3, 2, 3)])
def test_head_conv_is_the_transposed_conv_of_a_1x1_input(c, o, k):
    gen = torch.Generator().manual_seed(c + o)
    z = torch.randn(6, c, generator=gen, dtype=torch.float64)
    w = torch.randn(c, o, k, k, generator=gen, dtype=torch.float64)
    ref = _outputs_and_grads(lambda z, w: F.conv_transpose2d(z.view(6, c, 1, 1), w), z, w, 1)
    got = _outputs_and_grads(head_conv, z, w, 1)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("c", "o"), [(16, 1), (16, 3), (5, 2)])
@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (7, 4), (32, 32)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_narrow_conv_is_the_3x3_conv(c, o, h, w, channels_last):
    """float64, odd and even and one-pixel sizes, either layout: output and both gradients agree."""
    gen = torch.Generator().manual_seed(c * o + h * w)
    x = torch.randn(3, c, h, w, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    k = torch.randn(o, c, 3, 3, generator=gen, dtype=torch.float64)
    ref = _outputs_and_grads(lambda x, k: F.conv2d(x, k, padding=1), x, k, 2)
    got = _outputs_and_grads(narrow_conv3x3, x, k, 2)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if channels_last:  # the input gradient comes back in the input's layout
        assert got[1].is_contiguous(memory_format=torch.channels_last)


def test_narrow_conv_is_used_only_where_it_was_measured_to_pay():
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert narrow_pays(x, torch.ones(1, 16, 3, 3))
    assert narrow_pays(x, torch.ones(3, 16, 3, 3))
    assert not narrow_pays(x[:, :4].contiguous(memory_format=torch.channels_last), torch.ones(3, 4, 3, 3))
    assert not narrow_pays(x.contiguous(), torch.ones(1, 16, 3, 3))  # NCHW
    assert not narrow_pays(x.double(), torch.ones(1, 16, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not narrow_pays(x, torch.ones(1, 16, 3, 3))
