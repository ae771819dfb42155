"""The documentation stays true to the code and speaks only of the project itself."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from prism_flwr.config import RunConfig
from tools import gen_config_docs

ROOT = Path(__file__).resolve().parents[1]

# Words about how the project was made rather than what it is: work tickets, work sessions, borrowed
# machines, people. Each pattern is narrow enough that ordinary words ("tissue", a pytest "session"
# fixture, a process "session", a "helper" function) never match.
# The pattern and its examples are data (tests/support/process_words.json, skipped by the scan like
# every JSON file), so this file does not quote the phrases it forbids.
_WORDS = json.loads((Path(__file__).parent / "support" / "process_words.json").read_text())
PROCESS_WORDS = re.compile(_WORDS["pattern"], re.IGNORECASE)

SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or name == SELF or name.endswith(".json") or not path.is_file():
            continue
        if b"\0" in path.read_bytes()[:8192]:  # binary
            continue
        files.append(path)
    return files


def test_configuration_page_is_current():
    """docs/configuration.md is what tools/gen_config_docs.py renders from the code now."""
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == gen_config_docs.render(), "run: python -m tools.gen_config_docs"


def test_every_key_is_documented_with_its_pyproject_default():
    defaults = gen_config_docs.pyproject_defaults()
    keys = {f.alias or n for n, f in RunConfig.model_fields.items()}
    assert keys == set(defaults), "pyproject.toml and RunConfig name different keys"
    parsed = RunConfig.parse(defaults)
    for name, field in RunConfig.model_fields.items():
        assert field.description, f"{name} has no description"
        assert getattr(parsed, name) == field.default, f"{name}: pyproject default differs from RunConfig's"


def test_page_marks_a_key_missing_from_pyproject():
    defaults = gen_config_docs.pyproject_defaults()
    del defaults["robust-trim"]
    row = next(r for r in gen_config_docs.render(defaults).splitlines() if r.startswith("| `robust-trim`"))
    assert "`1` (not in pyproject.toml)" in row


def test_allowed_values_come_from_the_types():
    fields = RunConfig.model_fields
    assert gen_config_docs.allowed(fields["download"]) == '`"auto"`, `true`, `false`'
    assert gen_config_docs.allowed(fields["ngf"]) == "integer >= 1, <= 512"
    assert gen_config_docs.allowed(fields["dp_clip"]) == "number > 0, < 0.5"


@pytest.mark.parametrize("text", _WORDS["caught"])
def test_process_words_are_caught(text):
    assert PROCESS_WORDS.search(text)


@pytest.mark.parametrize(
    "text",
    [
        "tissue",
        "@pytest.fixture(scope='session')",
        "runs the command in a new session",
        "torchvision's download helpers",
        "a helper function",
        "silently excellent",
        "leading zeros",
        "issues a warning",
    ],
)
def test_ordinary_words_pass(text):
    assert not PROCESS_WORDS.search(text)


def test_project_speaks_of_itself():
    """No tracked text file talks about tickets, work sessions, borrowed machines or people."""
    hits = []
    for path in _tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if match := PROCESS_WORDS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:90]}")
    assert not hits, "\n".join(hits)


def test_keys_are_grouped_by_the_comments_in_runconfig():
    groups = gen_config_docs.field_groups()
    assert groups["dataset"] == "data" and groups["dp_epsilon"] == "privacy"
    assert set(groups) == set(RunConfig.model_fields)
