"""The CUDA-only path of local training (graph capture), run where a GPU is visible.

CI has no GPU, so these are skipped there; ``benchmarks/gpu_session.sh`` runs them on the device
machine (their result is in docs/gpu.md). What they pin down:
- the captured step trains: the loss falls and the scores move as on the CPU;
- the same seed on the same device gives bit-identical scores (graph and eager alike);
- the graph and eager paths sample the same distribution: their losses agree within noise.
"""

import pytest
import torch

from prism_flwr.model.features import PixelFeatures
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import get_scores
from prism_flwr.model.training import ClientState, NonFiniteError, TrainSettings, train_local

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _data(n=2048):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 32, 32, generator=g) * 0.4 - 0.8
    x[:, :, 8:24, 8:24] += 1.2  # a bright square on a dark field: something to learn
    return x.cuda()


def _train(graph: bool, seed: int = 0, steps: int = 60, objective: str = "mmd"):
    torch.manual_seed(seed)
    model = ResnetGenerator(GeneratorSpec(ngf=16, seed=3)).cuda()
    state = ClientState()
    out = train_local(
        model,
        PixelFeatures(),
        _data(),
        TrainSettings(steps=steps, objective=objective),
        state,
        torch.Generator(device="cuda").manual_seed(seed),
        cuda_graph=graph,
    )
    return out, get_scores(model)


@pytest.mark.parametrize("objective", ["mmd", "feature-matching"])
def test_graph_training_trains(objective):
    first, scores0 = _train(True, steps=4, objective=objective)
    later, scores = _train(True, steps=120, objective=objective)
    assert torch.isfinite(scores).all()
    assert not torch.equal(scores0, scores)
    assert later["loss"] < first["loss"]


@pytest.mark.parametrize("graph", [True, False])
def test_same_seed_same_device_is_bit_identical(graph):
    a, sa = _train(graph, seed=5)
    b, sb = _train(graph, seed=5)
    assert torch.equal(sa, sb) and a == b
    _, sc = _train(graph, seed=6)
    assert not torch.equal(sa, sc)


def test_graph_and_eager_sample_the_same_distribution():
    graph = [_train(True, seed=s)[0]["loss"] for s in range(4)]
    eager = [_train(False, seed=s)[0]["loss"] for s in range(4)]
    mg, me = sum(graph) / 4, sum(eager) / 4
    spread = max(max(graph) - min(graph), max(eager) - min(eager))
    assert abs(mg - me) <= spread + 0.05 * abs(me), (graph, eager)


def test_non_finite_data_is_caught_once_per_round():
    model = ResnetGenerator(GeneratorSpec(ngf=8, seed=3)).cuda()
    data = _data()
    data[:] = float("nan")
    with pytest.raises(NonFiniteError):
        train_local(
            model,
            PixelFeatures(),
            data,
            TrainSettings(steps=10, objective="mmd"),
            ClientState(),
            torch.Generator(device="cuda").manual_seed(0),
            cuda_graph=True,
        )


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_graph_round_shorter_than_the_warmup_runs_eagerly(steps):
    a, sa = _train(True, seed=2, steps=steps)
    b, sb = _train(True, seed=2, steps=steps)
    assert torch.isfinite(sa).all() and torch.equal(sa, sb) and a == b


def test_graph_round_draws_from_the_data_device_generator():
    """Seeded through the data's device: advancing the current device's default generator
    between two runs of one seed changes nothing."""
    a, sa = _train(True, seed=9, steps=6)
    torch.cuda.manual_seed(12345)
    torch.rand(10, device="cuda")
    b, sb = _train(True, seed=9, steps=6)
    assert torch.equal(sa, sb) and a == b
