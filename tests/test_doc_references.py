"""Docs that cannot drift: every repository path, test, module and config key that README.md and
docs/ name in backticks exists (paths relative to the repository root or to ``prism_flwr/``)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from prism_flwr.config import RunConfig
from prism_flwr.node_config import NodeConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} | {".ci"}
PACKAGES = {p.name for p in (ROOT / "prism_flwr").iterdir() if p.is_dir() and not p.name.startswith("_")}
TICKED = re.compile(r"`([^`\n]+)`")
# a path: segments of letters, digits, _ . - joined by /, optionally ending in / or ::test_name
PATH = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?(::[A-Za-z0-9_]+)?")
MODULE = re.compile(r"prism_flwr(\.[A-Za-z_][A-Za-z0-9_]*)+")
# `key = value` or `key=value` with a kebab-case key, as run or node config is written
ASSIGNMENT = re.compile(r"^([a-z][a-z0-9]*(?:-[a-z0-9]+)+) ?= ?\S")
# keys the pages show that are not run or node config: Flower's federation, connection and message
# config, and the metric every reply carries
OTHER_KEYS = {
    "num-examples",
    "root-certificates",
    "num-supernodes",
    "client-resources-num-cpus",
    "client-resources-num-gpus",
    "init-args-num-cpus",
    "init-args-num-gpus",
    "server-round",
    "run-tag",
}


def _ticked() -> list[tuple[str, str]]:
    return [(page.name, m.group(1).strip()) for page in PAGES for m in TICKED.finditer(page.read_text())]


def _repo_path(token: str) -> tuple[Path, str] | None:
    """(file, test name) for a token that names something in this repository, else None."""
    if not PATH.fullmatch(token) or "/" not in token and "::" not in token:
        return None
    path, _, test = token.partition("::")
    first = path.split("/")[0]
    if first in TOP:
        return ROOT / path, test
    if first in PACKAGES:
        return ROOT / "prism_flwr" / path, test
    return None


def _ignored(path: Path) -> bool:
    inside = path / "x"  # a folder pattern (``out/``) matches what lies inside a folder not yet made
    out = subprocess.run(["git", "check-ignore", str(path), str(inside)], cwd=ROOT, capture_output=True)
    return out.returncode == 0


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_named_path_and_test_exists() -> None:
    missing = []
    for page, token in _ticked():
        found = _repo_path(token)
        if found is None:
            continue
        path, test = found
        if not path.exists() and not _ignored(path):  # an ignored path is an output the docs point to
            missing.append(f"{page}: `{token}` (no {path.relative_to(ROOT)})")
        elif test and test not in _tests_in(path):
            missing.append(f"{page}: `{token}` (no test {test} in {path.relative_to(ROOT)})")
    assert not missing, "\n".join(missing)


def _importable(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a parent is a module, not a package: ``name`` is an attribute
            continue
        if spec is not None:
            obj = importlib.import_module(name)
            for attr in parts[cut:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


def test_every_named_module_exists() -> None:
    names = {m.group(0) for _, token in _ticked() for m in MODULE.finditer(token)}
    assert not sorted(n for n in names if not _importable(n))


def _keys(model) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items()}


def test_every_config_key_shown_exists() -> None:
    known = _keys(RunConfig) | _keys(NodeConfig) | OTHER_KEYS
    shown = [(page, m.group(1)) for page, token in _ticked() for m in [ASSIGNMENT.match(token)] if m]
    assert shown, "the pages show no config assignment: the pattern is wrong"
    assert not [f"{page}: `{key}`" for page, key in shown if key not in known]


@pytest.mark.parametrize(
    "token,exists",
    [
        ("prism_flwr/privacy/ledger.py", True),
        ("privacy/ledger.py", True),
        ("prism_flwr/privacy/nowhere.py", False),
        ("tests/test_doc_references.py::test_every_named_path_and_test_exists", True),
        ("tests/test_doc_references.py::test_that_is_not_there", False),
    ],
)
def test_the_path_check_catches_what_is_missing(token: str, exists: bool) -> None:
    path, test = _repo_path(token)
    assert (path.exists() and (not test or test in _tests_in(path))) is exists


def test_the_module_and_key_checks_catch_what_is_missing() -> None:
    assert _importable("prism_flwr.privacy.modes.privacy_for")
    assert not _importable("prism_flwr.privacy.modes.nothing_here")
    assert ASSIGNMENT.match("dp-epsilon = 9.8") and not ASSIGNMENT.match("dp")
    assert "dp-epsilon" in _keys(RunConfig) and "no-such-key" not in _keys(RunConfig) | _keys(NodeConfig)
