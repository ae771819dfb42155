"""Presets: each parses as TOML, holds only known keys and validates with the defaults (RunConfig)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from prism_flwr.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.toml"))


def _defaults() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_one_preset_per_dataset_and_the_paper_ones() -> None:
    assert {p.stem for p in PRESETS} >= {"cifar10", "mnist", "celeba", "paper-fmnist", "paper-fmnist-dp"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_and_validates(preset: Path) -> None:
    values = tomllib.loads(preset.read_text())
    assert set(values) <= set(_defaults()), f"unknown keys in {preset.name}: {set(values) - set(_defaults())}"
    cfg = RunConfig.parse({**_defaults(), **values})
    if preset.stem in ("cifar10", "mnist", "celeba"):
        assert cfg.dataset == preset.stem and cfg.download == "auto"
        assert cfg.output_dir.endswith(
            f"outputs-{preset.stem}"
        )  # runs of different datasets do not overwrite


def test_run_sh_example_uses_a_form_flower_accepts() -> None:
    """Flower 1.42 refuses unquoted strings (`dataset=cifar10`); run.sh's example must not show that form."""
    text = (ROOT / "run.sh").read_text()
    assert "dataset=cifar10" not in text
    assert "presets/cifar10.toml" in text


@pytest.mark.parametrize("name", ["paper-fmnist", "paper-fmnist-dp"])
def test_paper_presets_pin_the_paper_values_whatever_the_defaults(name: str) -> None:
    values = tomllib.loads((ROOT / "presets" / f"{name}.toml").read_text())
    assert {
        k: values.get(k)
        for k in (
            "local-steps",
            "batch-size",
            "lr",
            "aggregation",
            "ngf",
            "num-server-rounds",
            "objective",
            "features",
        )
    } == {
        "local-steps": 100,
        "batch-size": 64,
        "lr": 0.1,
        "aggregation": "mada",
        "ngf": 64,
        "num-server-rounds": 500,
        "objective": "feature-matching",
        "features": "vgg19",
    }
