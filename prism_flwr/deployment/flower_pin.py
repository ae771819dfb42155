"""The Flower version whose internals this project relies on: 1.42.x, checked before they are imported.

Flower's internals (modules outside ``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``) change
between minor versions without notice. Their users check this pin first and list, in their module
docstring, every internal they import: ``prism_flwr/deployment/executor.py`` (the Runtime API) and
``strategies/wire.py`` (how a message is serialised).
"""

from __future__ import annotations

import importlib.metadata

SUPPORTED_FLOWER = "1.42."


class UnsupportedFlowerVersion(RuntimeError):
    """The installed Flower is not the version this code was written and tested against."""


def installed_flower_version() -> str:
    return importlib.metadata.version("flwr")


def require_flower(user: str, otherwise: str = "", version: str | None = None) -> str:
    """Return ``version`` (default: the installed Flower's) or refuse it: ``user`` relies on 1.42.x
    internals; ``otherwise``: what to do instead of installing that version, if anything."""
    version = installed_flower_version() if version is None else version
    if not version.startswith(SUPPORTED_FLOWER):
        fix = f"{otherwise} or install" if otherwise else "Install"
        raise UnsupportedFlowerVersion(
            f"{user} relies on Flower internals and was tested with Flower {SUPPORTED_FLOWER}x only; the "
            f"installed Flower is {version}. {fix} flwr=={SUPPORTED_FLOWER}*"
        )
    return version
