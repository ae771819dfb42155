"""Every experiment and benchmark module still imports: they call the package's functions by name,
and a renamed or removed function must fail here, not when someone next runs a study."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    f"{folder}.{path.stem}"
    for folder in ("experiments", "benchmarks")
    for path in (ROOT / folder).glob("*.py")
    if path.stem != "__init__"
)


def test_the_modules_are_found():
    assert {"experiments.late_phase", "experiments.default_budget", "benchmarks.cpu_step"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
