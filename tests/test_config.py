"""Run config: pyproject defaults are valid; every bad key is named with what is allowed."""

import tomllib
from pathlib import Path

import pytest

from prism_flwr import options
from prism_flwr.config import ConfigError, RunConfig
from tools.gen_config_docs import choices

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


# ------------------------------------------------------------------------------ the options table
def _values(key: str) -> list:
    """The values run-config key ``key`` allows (a Literal field)."""
    name = key.replace("-", "_")
    assert name in RunConfig.model_fields, f"options table names unknown key {key!r}"
    allowed = choices(RunConfig.model_fields[name].annotation)
    assert allowed is not None, f"options table names {key!r}, which is not a choice"
    return allowed


def test_the_table_names_real_keys_and_values():
    for rule in options.RULES:
        for key, values in (*rule.when.items(), (rule.key, rule.allowed)):
            assert set(values) <= set(_values(key)), (rule, key)
        assert set(_values(rule.key)) - set(rule.allowed), f"{rule} refuses nothing"
    for unused in options.UNUSED:
        for key, values in unused.when.items():
            assert set(values) <= set(_values(key))
        for key in unused.keys:
            _values(key)
    for key in options.MATRIX_KEYS:
        _values(key)


@pytest.mark.parametrize("rule", options.RULES, ids=lambda r: f"{r.key}-when-{'-'.join(r.when)}")
def test_every_rule_refuses_its_combinations_in_one_line(rule):
    base = {**defaults(), **{k: v[0] for k, v in rule.when.items()}}
    for value in _values(rule.key):
        run = {**base, rule.key: value}
        if value in rule.allowed:
            RunConfig.parse(run)  # the rule alone refuses nothing else: no other rule bites here
            continue
        with pytest.raises(ConfigError) as err:
            RunConfig.parse(run)
        message = str(err.value)
        assert "\n" not in message and rule.why in message
        assert f"{rule.key}={value!r}" in message and message.startswith("invalid run config: ")
