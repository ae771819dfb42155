"""The app bundle (FAB) as Flower builds it for a deployment, from a clean copy of the checkout.

``app_copy`` copies what git tracks plus every module of the apps (tracked or not) into a fresh
folder, as a clone would hold them; ``build_fab`` runs ``flwr build --app`` there, so Flower's own
``.gitignore`` handling decides what the bundle holds. ``app_modules`` lists what it must hold.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tools.flowerkit import REPO, exe, flower_env

APP_FILES = ("client_app.py", "server_app.py", "pyproject.toml")
PACKAGES = ("prism_flwr", "strategies")


def app_modules(root: Path = REPO) -> list[str]:
    """Every module the apps may import: the two app files and each .py of the packages."""
    found = [p.relative_to(root).as_posix() for pkg in PACKAGES for p in (root / pkg).rglob("*.py")]
    return sorted([f for f in found if "__pycache__" not in f] + [f for f in APP_FILES if f.endswith(".py")])


def app_copy(dest: Path, root: Path = REPO) -> Path:
    """A copy of the checkout's tracked files (working-tree content) plus every app module."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True, timeout=60
    ).stdout.decode()
    files = {f for f in listed.split("\0") if f} | set(app_modules(root)) | {".gitignore"}
    for rel in sorted(files):
        source = root / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    return dest


def build_fab(app: Path, work: Path) -> Path:
    """``flwr build --app APP`` run in ``work``; the one .fab it writes."""
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [exe("flwr"), "build", "--app", str(app)],
        env=flower_env(home),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    fabs = list(work.glob("*.fab"))
    assert done.returncode == 0 and len(fabs) == 1, done.stdout + done.stderr
    return fabs[0]
