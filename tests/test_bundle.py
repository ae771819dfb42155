"""The app bundle (FAB) that Flower ships to every node holds every module of the apps.

Flower packs the bundle through ``.gitignore``; a node puts the unpacked bundle first on
``sys.path``, so a module missing from it fails the node's first message (an editable install
hides this, a real node does not). Built from a clean copy of the checkout (tests/support/bundle.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from tests.support.bundle import PACKAGES, app_copy, app_modules, build_fab


def _fab_names(tmp_path: Path, ignore: str | None = None) -> set[str]:
    app = app_copy(tmp_path / "app")
    if ignore is not None:
        (app / ".gitignore").write_text(ignore)
    return set(zipfile.ZipFile(build_fab(app, tmp_path)).namelist())


def test_bundle_holds_every_app_module(tmp_path: Path) -> None:
    names = _fab_names(tmp_path)
    missing = [m for m in app_modules() if m not in names]
    assert not missing, f"the FAB lacks {missing}: check .gitignore (anchor folder patterns with '/')"
    # every package folder is a regular package: a namespace portion would import from elsewhere
    folders = {str(Path(m).parent.as_posix()) for m in app_modules() if m.split("/")[0] in PACKAGES}
    assert not [f for f in folders if f"{f}/__init__.py" not in names], sorted(folders)
    assert not [n for n in names if n.split("/")[0] in {".venv", "data", "outputs", ".git"}]


def test_unanchored_pattern_is_caught(tmp_path: Path) -> None:
    """The check above fails for the .gitignore line that once broke every deployment."""
    names = _fab_names(tmp_path, ignore="data/\n")
    assert [m for m in app_modules() if m not in names] == sorted(
        m for m in app_modules() if m.startswith("prism_flwr/data/")
    )
