"""Which app bundles a node runs: the node-config key ``trusted-apps`` and the check of a FAB.

``trusted-apps = "HASH [HASH ...]"``: SHA-256 (hex) of the FAB files the node runs (spaces or commas
between). A FAB runs only if sha256(its bytes) is listed, the hash the SuperLink states for it is
that hash, and the run's app id and version are the ones in its pyproject (so Flower loads the
copy of exactly these bytes). Without the key every FAB runs, as in Flower. Standard library only:
the ClientApp worker loads this file by path, before any code of the bundle.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import tomllib

PIN_KEY = "trusted-apps"
_HASH = re.compile(r"[0-9a-f]{64}")


class AppNotTrusted(RuntimeError):
    """This node does not run the app bundle it was sent (one line, for the server)."""


def parse_pins(text: object) -> frozenset[str]:
    """``"a1b2... , c3d4..."`` -> the set of hashes; ValueError naming the first bad entry."""
    if not isinstance(text, str):
        raise ValueError(f"{PIN_KEY} must be a string of SHA-256 hashes, got {type(text).__name__}")
    pins = [p for p in re.split(r"[\s,]+", text.strip().lower()) if p]
    for pin in pins:
        if not _HASH.fullmatch(pin.removeprefix("sha256:")):
            raise ValueError(f"{PIN_KEY}: {pin[:80]!r} is not a SHA-256 hash (64 hex digits)")
    return frozenset(p.removeprefix("sha256:") for p in pins)


def fab_identity(content: bytes) -> tuple[str, str]:
    """(app id ``publisher/name``, version) as the FAB's pyproject states them (Flower's rule)."""
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        config: dict[str, Any] = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
    return f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}", config["project"][
        "version"
    ]


def check_bundle(
    node_config: Mapping[str, Any], content: bytes, stated_hash: str, fab_id: str, fab_version: str
) -> str | None:
    """The FAB's SHA-256 when this node pins apps and trusts this one; None when it pins none.

    Raises ``AppNotTrusted`` otherwise. ``node_config``: the node's own (never the run config)."""
    if PIN_KEY not in node_config:
        return None
    try:
        pins = parse_pins(node_config[PIN_KEY])
    except ValueError as err:
        raise AppNotTrusted(f"node refuses every app: {err}") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest not in pins:
        raise AppNotTrusted(
            f"node refuses the app: its FAB (sha256 {digest}) is not in this node's {PIN_KEY}"
        )
    if stated_hash != digest:
        raise AppNotTrusted(
            f"node refuses the app: the FAB's stated hash is not the hash of its content ({digest})"
        )
    try:
        identity = fab_identity(content)
    except (KeyError, ValueError, zipfile.BadZipFile, tomllib.TOMLDecodeError):
        raise AppNotTrusted(f"node refuses the app: FAB {digest} has no readable pyproject.toml") from None
    if identity != (fab_id, fab_version):
        raise AppNotTrusted(
            f"node refuses the app: the run names {fab_id} {fab_version}, FAB {digest} is "
            f"{identity[0]} {identity[1]}"
        )
    return digest
