"""Learning is real: local training on real Fashion-MNIST brings samples closer to the data."""

import torch

from prism_flwr.data.datasets import load_dataset
from prism_flwr.model.generator import generate
from prism_flwr.model.features import build_features
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
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
    first = train_local(model, build_features("pixels"), train, settings, state, torch.Generator().manual_seed(0))
    second = train_local(model, build_features("pixels"), train, settings, state, torch.Generator().manual_seed(1))
    after = _mmd_to_test_split(model, data_dir)

    assert second["loss"] < first["loss"]              # the objective goes down
    assert after < 0.5 * before, (before, after)       # samples measurably closer to held-out data
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
        return ((fake.mean(0) - train.mean(0)).pow(2).mean() + (fake.var(0) - train.var(0)).pow(2).mean()).item()

    before = gap()
    state = ClientState()
    gaps = []
    for r in range(3):  # the moving averages lag, so the gap oscillates: judge the mean over rounds
        train_local(model, feats, train, TrainSettings(steps=40, objective="feature-matching"), state,
                     torch.Generator().manual_seed(r))
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
        train_local(model, build_features("pixels"), data, TrainSettings(steps=3, objective="mmd"), ClientState(),
                    torch.Generator().manual_seed(0))
    assert not any(ch.isdigit() for ch in str(err.value))
