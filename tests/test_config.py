"""Run config: pyproject defaults are valid; every bad key is named with what is allowed."""

import tomllib
from pathlib import Path

import pytest

from prism_flwr.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def defaults() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_keys_are_exactly_the_model_fields():
    cfg = RunConfig.parse(defaults())
    assert set(defaults()) == set(cfg.model_dump(by_alias=True))
    # pyproject and the model agree on every default
    assert RunConfig.parse({}).model_dump(by_alias=True) == cfg.model_dump(by_alias=True)


def test_presets_are_valid():
    presets = sorted((PYPROJECT.parent / "presets").glob("*.toml"))
    assert presets, "presets/ holds no *.toml: nothing would be checked"
    for preset in presets:
        RunConfig.parse({**defaults(), **tomllib.loads(preset.read_text())})


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "dataset",
            "foo",
            "run-config key 'dataset' = 'foo': Input should be 'mnist', 'fmnist', 'cifar10' or 'celeba'",
        ),
        ("ngf", -1, "run-config key 'ngf' = -1: Input should be greater than or equal to 1"),
        (
            "ngf",
            "wide",
            "run-config key 'ngf' = 'wide': Input should be a valid integer, unable to parse string as an integer",
        ),
        ("lr", 0.0, "run-config key 'lr' = 0.0: Input should be greater than 0"),
        (
            "aggregation",
            "median",
            "run-config key 'aggregation' = 'median': Input should be 'mada', 'mean', 'mada-change', 'adam' or 'beta'",
        ),
        (
            "fraction-train",
            1.5,
            "run-config key 'fraction-train' = 1.5: Input should be less than or equal to 1",
        ),
        (
            "fraction-evaluate",
            -0.5,
            "run-config key 'fraction-evaluate' = -0.5: Input should be greater than or equal to 0",
        ),
        (
            "resume",
            "maybe",
            "run-config key 'resume' = 'maybe': Input should be a valid boolean, unable to interpret input",
        ),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(key, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.parse({**defaults(), key: value})
    assert str(err.value) == message


def test_unknown_key_and_cross_key_checks():
    with pytest.raises(
        ConfigError, match="run-config key 'num-rounds' is unknown \\(known keys: .*num-server-rounds"
    ):
        RunConfig.parse({"num-rounds": 3})
    with pytest.raises(ConfigError, match="dp='statistics'.*mmd"):
        RunConfig.parse({"dp": "statistics", "objective": "mmd"})
    with pytest.raises(ConfigError, match="use dataset='celeba'"):
        RunConfig.parse({"partitioning": "attribute"})
    with pytest.raises(ConfigError, match="robust-aggregation applies to PRISM's masks"):
        RunConfig.parse({"method": "dense", "robust-aggregation": "on"})
    assert RunConfig.parse({"method": "dense"}).robust_aggregation == "off"
