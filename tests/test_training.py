"""Learning is real: local training on real Fashion-MNIST brings samples closer to the data."""

import torch

from prism_flwr.data.datasets import load_dataset
from prism_flwr.model.features import build_features
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator, generate
from prism_flwr.model.masked import masked_layers, set_mask_mode
from prism_flwr.model.objectives import mmd2_unbiased
from prism_flwr.model.training import ClientState, TrainSettings, train_local


def _mmd_to_test_split(model, data_dir, n=500):
    real = load_dataset("fmnist", data_dir, train=False).to_float(torch.arange(n).numpy())
    set_mask_mode(model, "sample")
    return mmd2_unbiased(generate(model, n, seed=1), real).item()


def test_mmd_training_beats_the_untrained_masked_network(data_dir):
    torch.manual_seed(0)
    train = load_dataset("fmnist", data_dir).to_float(torch.arange(3000).numpy())
    model = ResnetGenerator(GeneratorSpec(ngf=16, nc=1, seed=3))
    weights_before = [m.weight.clone() for m in masked_layers(model)]
    before = _mmd_to_test_split(model, data_dir)

    state = ClientState()
    settings = TrainSettings(steps=100, objective="mmd")
    first = train_local(
        model, build_features("pixels"), train, settings, state, torch.Generator().manual_seed(0)
    )
    second = train_local(
        model, build_features("pixels"), train, settings, state, torch.Generator().manual_seed(1)
    )
    after = _mmd_to_test_split(model, data_dir)

    assert second["loss"] < first["loss"]  # the objective goes down
    assert after < 0.5 * before, (before, after)  # samples measurably closer to held-out data
    assert all(torch.equal(w, m.weight) for w, m in zip(weights_before, masked_layers(model)))
    assert state.score_opt  # Adam moments carried to the next round


def test_feature_matching_training_closes_the_feature_gap(data_dir):
    torch.manual_seed(0)
    train = load_dataset("fmnist", data_dir).to_float(torch.arange(2000).numpy())
    model = ResnetGenerator(GeneratorSpec(ngf=8, nc=1, seed=4))
    feats = build_features("pixels")

    def gap():
        set_mask_mode(model, "sample")
        fake = generate(model, 500, seed=2)
        return (
            (fake.mean(0) - train.mean(0)).pow(2).mean() + (fake.var(0) - train.var(0)).pow(2).mean()
        ).item()

    before = gap()
    state = ClientState()
    gaps = []
    for r in range(3):  # the moving averages lag, so the gap oscillates: judge the mean over rounds
        train_local(
            model,
            feats,
            train,
            TrainSettings(steps=40, objective="feature-matching"),
            state,
            torch.Generator().manual_seed(r),
        )
        gaps.append(gap())
    assert set(state.objective) >= {"mu_real", "var_real", "v_mean", "v_var"}
    assert sum(gaps) / len(gaps) < 0.5 * before, (before, gaps)


def test_non_finite_values_stop_the_round_with_a_clear_error():
    """A NaN (here in the data) spreads to the loss and the scores without any host check inside
    the step loop; the one check after the loop raises NonFiniteError (no number in its text),
    and sampling never sees a NaN probability."""
    import pytest

    from prism_flwr.model.training import NonFiniteError

    model = ResnetGenerator(GeneratorSpec(ngf=4, nc=1, seed=3))
    data = torch.full((16, 1, 32, 32), float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite") as err:
        train_local(
            model,
            build_features("pixels"),
            data,
            TrainSettings(steps=3, objective="mmd"),
            ClientState(),
            torch.Generator().manual_seed(0),
        )
    assert not any(ch.isdigit() for ch in str(err.value))


# --- the CUDA-graph round's schedule and seeding, checked without a GPU ---

from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402

from prism_flwr.model import training  # noqa: E402


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


class _FakeGraph:
    """Capture runs the step once (as recording would), replay counts."""

    def __init__(self):
        self.replays = 0
        _FakeGraph.made.append(self)

    def replay(self):
        self.replays += 1


@contextmanager
def _nothing(*args, **kwargs):
    yield


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and graph calls as no-ops, so ``_run_graphed`` runs on the CPU."""
    _FakeGraph.made = []
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", _nothing)
    monkeypatch.setattr(torch.cuda, "graph", _nothing)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    state = torch.default_generator.get_state()
    yield _FakeGraph.made
    torch.default_generator.set_state(state)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_graphed_round_of_any_length_runs_every_step_once(steps, fake_cuda):
    calls = []

    def step(gen):
        assert gen is None  # a graphed step draws from the device's default generator
        calls.append(len(calls))
        return torch.tensor(float(len(calls)))

    losses = torch.zeros(steps)
    training._run_graphed(step, losses, torch.device("cpu"), torch.Generator().manual_seed(1234))
    eager = min(steps, training.WARMUP_STEPS)
    assert len(calls) == eager + (steps > eager)  # warm-up steps, plus one captured when replays follow
    assert [g.replays for g in fake_cuda] == ([steps - eager] if steps > eager else [])
    assert losses.tolist() == [float(i + 1) for i in range(eager)] + [float(eager + 1)] * (steps - eager)
    assert training.graph_plan(steps) == (eager, steps - eager)


def test_graphed_round_seeds_the_generator_of_the_data_device(fake_cuda):
    training._run_graphed(
        lambda gen: torch.zeros(()), torch.zeros(5), torch.device("cpu"), torch.Generator().manual_seed(4321)
    )
    assert torch.default_generator.initial_seed() == 4321


def test_device_generator_is_the_device_s_own(monkeypatch):
    gens = (torch.Generator(), torch.Generator(), torch.Generator())
    monkeypatch.setattr(torch.cuda, "default_generators", gens)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert training.device_generator(torch.device("cuda:2")) is gens[2]
    assert training.device_generator(torch.device("cuda")) is gens[0]
    assert training.device_generator(torch.device("cpu")) is torch.default_generator
