"""scripts/check-images.sh and the Dockerfiles' base selection, without building anything.

The script itself builds images and runs containers (minutes, a container engine): it is run by
hand and its log kept under results/deployment/. Here: it parses (``bash -n``, and ShellCheck
where installed), and every app Dockerfile still starts from Flower's image unless told otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check-images.sh"


def test_script_parses() -> None:
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_script_passes_shellcheck() -> None:
    out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("name", ["serverapp", "clientapp"])
def test_app_images_default_to_flowers_base(name: str) -> None:
    text = (REPO / "docker" / f"{name}.Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=flwr/superexec:\$\{FLWR_VERSION\}$", text, re.M), name
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["${BASE_IMAGE}"], froms


def test_debian_stand_ins_cover_what_the_script_runs() -> None:
    """Every --target the script builds from docker/debian.Dockerfile exists there."""
    dockerfile = (REPO / "docker" / "debian.Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    script = SCRIPT.read_text()
    loop = re.search(r"for target in ([a-z0-9 -]+); do", script)
    assert loop, "the script's loop over debian.Dockerfile targets moved"
    assert set(loop.group(1).split()) <= stages, (loop.group(1), stages)
