"""`.ci/run` on stand-ins for its steps: pytest's "no tests collected" (exit code 5) fails CI with
a line saying so; a passing suite passes; a failing one fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ci_with_suite_exiting(tmp_path: Path, code: int) -> subprocess.CompletedProcess:
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text("exit 0\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "ruff").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / ".venv" / "bin" / "ruff").chmod(0o755)
    (tmp_path / "test.sh").write_text(f"exit {code}\n")
    return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("code", [0, 1, 5])
def test_ci_fails_when_the_suite_fails_or_ran_no_test(tmp_path: Path, code: int) -> None:
    done = _ci_with_suite_exiting(tmp_path, code)
    assert done.returncode == code, done.stdout + done.stderr
    assert ("collected no tests" in done.stdout) == (code == 5), done.stdout
