"""The fast CPU step: bf16 autocast chosen from the CPU's flags, the same model in NHWC, the
skip conv before the upsampling, the uniform-draw sampler; float32 state throughout."""

import pytest
import torch
import torch.nn.functional as F

from prism_flwr.model import precision
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import _BernoulliSample, masked_layers, masked_weights
from prism_flwr.model.precision import cpuinfo_flags, generator_autocast, resolve_precision
from prism_flwr.model.training import ClientState, TrainSettings, train_local


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16."""

    def set_(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: value)

    return set_


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(bf16_cpu):
    bf16_cpu(True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == "float32"  # GPUs keep their own path
    bf16_cpu(False)
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # forced either way
    assert resolve_precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainSettings(precision="half")


def test_cpu_flags_come_from_cpuinfo_when_torch_cannot_say(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n\nflags : other\n")
    assert cpuinfo_flags(info) == {"fpu", "sse2", "avx2", "avx512f", "amx_bf16", "amx_tile"}
    assert cpuinfo_flags(tmp_path / "missing") == set()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: {"avx2", "avx512f"})
    precision.cpu_has_bf16.cache_clear()
    try:
        assert precision.cpu_has_bf16() is False
        precision.cpu_has_bf16.cache_clear()
        monkeypatch.setattr(precision, "cpuinfo_flags", lambda: {"avx2", "avx512_bf16"})
        assert precision.cpu_has_bf16() is True
    finally:
        precision.cpu_has_bf16.cache_clear()


def _reference_forward(model, z, w):
    """The generator as the paper draws it: NCHW, skip conv after the upsampling."""
    h = model.head(z.view(z.shape[0], -1, 1, 1), w[0])
    for i, b in enumerate(model.blocks):
        w1, w2, ws = w[1 + 3 * i : 4 + 3 * i]
        y = b.conv2(F.relu(b.bn2(b.conv1(F.interpolate(F.relu(b.bn1(h)), scale_factor=2), w1))), w2)
        h = y + b.skip(F.interpolate(h, scale_factor=2), ws)
    return torch.tanh(model.out(F.relu(model.bn(h)), w[-1]))


def test_fast_forward_computes_the_papers_generator():
    torch.manual_seed(0)
    model = ResnetGenerator(GeneratorSpec(ngf=8, seed=5))
    z = torch.randn(16, 128)
    w = [m.weight * (torch.rand_like(m.weight) < 0.5) for m in masked_layers(model)]
    assert torch.allclose(model(z, w), _reference_forward(model, z, w), atol=1e-5)


def test_bf16_generator_runs_in_bf16_and_keeps_its_state_float32():
    torch.manual_seed(0)
    model = ResnetGenerator(GeneratorSpec(ngf=8, seed=5))
    with generator_autocast("bf16", "cpu"):
        assert model(torch.randn(4, 128)).dtype == torch.bfloat16
    with generator_autocast("float32", "cpu"):
        assert model(torch.randn(4, 128)).dtype == torch.float32
    data = torch.rand(64, 1, 32, 32) * 2 - 1
    state = ClientState()
    metrics = train_local(
        model,
        torch.nn.Flatten(),
        data,
        TrainSettings(steps=3, batch_size=16, objective="mmd", precision="bf16"),
        state,
        torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(m.scores.dtype == torch.float32 for m in masked_layers(model))
    assert state.score_opt and all(
        t.dtype == torch.float32 for t in state.score_opt.values() if t.is_floating_point()
    )


def test_bf16_score_gradient_points_where_the_float32_one_does():
    """Same masks, same latents: the scores' gradient under bf16 autocast vs float32."""
    model = ResnetGenerator(GeneratorSpec(ngf=16, seed=5))
    z, real = torch.randn(64, 128), torch.rand(64, 1024) * 2 - 1
    grads = []
    for prec in ("float32", "bf16"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same masks
        w = masked_weights(masked_layers(model))
        with generator_autocast(prec, "cpu"):
            fake = model(z, w)
        from prism_flwr.model.objectives import mmd2_unbiased

        mmd2_unbiased(fake.float().flatten(1), real).backward()
        grads.append(torch.cat([m.scores.grad.flatten() for m in masked_layers(model)]))
    cos = F.cosine_similarity(grads[0], grads[1], dim=0)
    rel = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert cos > 0.99 and rel < 0.1, (cos, rel)


def test_uniform_draw_sampler_has_bernoulli_law_and_the_scaled_gradient():
    torch.manual_seed(0)
    theta = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, float("nan")]).repeat(20000, 1).requires_grad_()
    m = _BernoulliSample.apply(theta, True)
    freq = m.detach().mean(0)
    assert torch.equal(freq[[0, 4, 5]], torch.tensor([0.0, 1.0, 0.0]))  # certain values, NaN -> 0
    assert torch.allclose(freq[1:4], torch.tensor([0.1, 0.5, 0.9]), atol=0.01)  # 4+ sd at n = 20000
    m.backward(torch.ones_like(m))
    assert torch.allclose(theta.grad[0, :5], theta.detach()[0, :5])  # dL/dtheta = theta * dL/dm
