"""conv3x3(up2(x)) as one stride-2 transposed conv with phase kernels: the same numbers and the same
gradients as upsampling then convolving, on toy and on the generator's real shapes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import make_dense, masked_layers, masked_weights
from prism_flwr.model.objectives import mmd2_unbiased
from prism_flwr.model.precision import generator_autocast
from prism_flwr.model.upconv import phase_kernel, phase_pays, up2_conv3x3


def _direct(x, w, b=None):
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)


def _forward_and_grads(fn, x, w, b, g):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    inputs = (x, w) if b is None else (x, w, b.detach().requires_grad_())
    y = fn(*inputs)
    return (y, *torch.autograd.grad(y, inputs, g))


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (4, 4), (5, 4), (7, 6)])
@pytest.mark.parametrize("bias", [False, True])
def test_phase_form_equals_upsample_then_conv(size, bias):
    """float64, odd and even sizes, with and without bias: output and all gradients agree to rounding."""
    gen = torch.Generator().manual_seed(sum(size) + bias)
    x = torch.randn(2, 5, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 5, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64) if bias else None
    g = torch.randn(2, 3, 2 * size[0], 2 * size[1], generator=gen, dtype=torch.float64)
    ref = _forward_and_grads(_direct, x, w, b, g)
    got = _forward_and_grads(up2_conv3x3, x, w, b, g)
    assert got[0].shape == ref[0].shape
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_phase_kernel_sums_the_taps_that_read_one_source_pixel():
    w = torch.arange(9.0).view(1, 1, 3, 3)
    k = phase_kernel(w)[0, 0]
    row = lambda r: [r[2], r[1] + r[2], r[0] + r[1], r[0]]  # noqa: E731  (w2, w1+w2, w0+w1, w0)
    rows = [row(w[0, 0, :, j].tolist()) for j in range(3)]  # along the height, per column
    expected = torch.tensor([row([rows[0][i], rows[1][i], rows[2][i]]) for i in range(4)])
    assert torch.equal(k, expected)
    assert float(k.sum()) == 4 * float(w.sum())  # every tap lands in 2 of the 4 per axis
    with pytest.raises(ValueError, match="3x3"):
        phase_kernel(torch.ones(2, 2, 1, 1))


def _direct_generator(model, z, w):
    """The generator's forward with conv1 applied to the upsampled input, as it is defined."""
    h = model.head(z.view(z.shape[0], -1, 1, 1), w[0]).contiguous(memory_format=torch.channels_last)
    for i, b in enumerate(model.blocks):
        w1, w2, ws = w[1 + 3 * i : 4 + 3 * i]
        y = b.conv2(F.relu(b.bn2(b.conv1(F.interpolate(F.relu(b.bn1(h)), scale_factor=2), w1))), w2)
        h = y + F.interpolate(b.skip(h, ws), scale_factor=2)
    return torch.tanh(model.out(F.relu(model.bn(h)), w[-1]))


def _grads(model, forward, masks, z, real):
    """Images and the gradients w.r.t. ``z`` and every layer's ``W * m`` (leaves), in the model's dtype."""
    dtype = model.head.weight.dtype
    w = [(m.weight * k.to(dtype)).requires_grad_() for m, k in zip(masked_layers(model), masks)]
    z = z.to(dtype).requires_grad_()
    fake = forward(model, z, w)
    grads = torch.autograd.grad(mmd2_unbiased(fake.flatten(1), real.to(dtype)), [z, *w])
    return [fake.detach(), *grads]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("nc", [1, 3])
def test_generator_forward_and_gradients_match_the_direct_form(nc):
    """The real layer shapes (ngf 16: 4 -> 8, 8 -> 16, 16 -> 32), the same masks: the images and the
    gradients w.r.t. the latents and every layer's ``W * m`` equal the direct form's exactly in float64,
    and in float32 lie within float32 rounding of float64, as the direct form's own numbers do. Three
    batch norms amplify rounding: the direct form's gradients are 1e-4 to 2e-3 (relative) from
    float64 depending on the thread count's summation order; a wrong tap is off by order 1."""
    model = ResnetGenerator(GeneratorSpec(ngf=16, nc=nc, seed=7))
    gen = torch.Generator().manual_seed(nc)
    masks = [torch.rand(m.weight.shape, generator=gen) < 0.5 for m in masked_layers(model)]
    z, real = torch.randn(32, 128, generator=gen), torch.rand(32, nc * 1024, generator=gen) * 2 - 1
    new = lambda m, z, w: m(z, w)  # noqa: E731
    model64 = copy.deepcopy(model).double()
    exact, direct64 = _grads(model64, new, masks, z, real), _grads(model64, _direct_generator, masks, z, real)
    direct32, new32 = _grads(model, _direct_generator, masks, z, real), _grads(model, new, masks, z, real)
    for e, d64, d32, n32 in zip(exact, direct64, direct32, new32):
        assert _rel(e, d64) < 1e-10
        assert max(_rel(n32, e), _rel(d32, e)) < 5e-3, (_rel(n32, e), _rel(d32, e))


def test_score_gradients_match_the_direct_form():
    """Through the sampler: the same masks drawn from the scores give the same score gradients (to
    float32 rounding, amplified by three batch norms; the exact comparison is the float64 one above)."""
    model = ResnetGenerator(GeneratorSpec(ngf=16, seed=5))
    gen = torch.Generator().manual_seed(0)
    z, real = torch.randn(32, 128, generator=gen), torch.rand(32, 1024, generator=gen) * 2 - 1
    grads = []
    for forward in (_direct_generator, lambda m, z, w: m(z, w)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same masks
        mmd2_unbiased(forward(model, z, masked_weights(masked_layers(model))).flatten(1), real).backward()
        grads.append(torch.cat([m.scores.grad.flatten() for m in masked_layers(model)]))
    assert _rel(grads[1], grads[0]) < 1e-3


def test_dense_baseline_weight_gradients_match_the_direct_form():
    model = ResnetGenerator(GeneratorSpec(ngf=8, seed=3))
    make_dense(model)
    z, real = torch.randn(16, 128), torch.rand(16, 1024) * 2 - 1
    grads = []
    for forward in (_direct_generator, lambda m, z, w: m(z, w)):
        model.zero_grad(set_to_none=True)
        w = [m.weight for m in masked_layers(model)]
        mmd2_unbiased(forward(model, z, w).flatten(1), real).backward()
        grads.append([m.weight.grad.clone() for m in masked_layers(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


def test_bf16_phase_form_stays_as_close_to_float32_as_the_direct_form():
    """Under bf16 autocast both forms round; the phase form's error against float32 is no larger."""
    model = ResnetGenerator(GeneratorSpec(ngf=16, seed=5))
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(m.weight.shape, generator=gen) < 0.5 for m in masked_layers(model)]
    z, real = torch.randn(64, 128, generator=gen), torch.rand(64, 1024, generator=gen) * 2 - 1
    new = lambda m, z, w: m(z, w)  # noqa: E731
    exact = _grads(model, new, masks, z, real)
    runs = {}
    for name, forward in (("direct", _direct_generator), ("phase", new)):
        with generator_autocast("bf16", "cpu"):
            runs[name] = _grads(model, lambda m, z, w, f=forward: f(m, z, w).float(), masks, z, real)
    for e, d, p in zip(exact, runs["direct"], runs["phase"]):
        assert _rel(p, e) <= 1.5 * _rel(d, e) + 1e-3, (_rel(p, e), _rel(d, e))


def test_the_saved_state_is_only_weights_and_scores():
    """The phase form adds no parameter or buffer: state dicts, masks and checkpoints keep their layout."""
    model = ResnetGenerator(GeneratorSpec(ngf=8))
    names = [n for n, m in model.named_modules() if m in masked_layers(model)]
    assert sorted(model.state_dict()) == sorted(f"{n}.{k}" for n in names for k in ("weight", "scores"))


def test_phase_form_is_used_where_it_was_measured_to_pay():
    small, large = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 8, 8)
    assert phase_pays(small) and phase_pays(large)  # float32: every layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not phase_pays(small) and phase_pays(large)  # bf16: from an 8x8 source up
