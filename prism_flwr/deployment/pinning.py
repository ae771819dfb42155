"""Which app bundles a node runs: node-config keys ``trusted-apps`` and ``trusted-app-keys``; the FAB check.

``trusted-apps = "HASH [HASH ...]"``: SHA-256 (hex) of the FAB files the node runs (spaces or commas
between). ``trusted-app-keys = "KEY [KEY ...]"``: Ed25519 public keys (hex, 32 bytes) of publishers
whose signed bundles it runs: the bundle holds ``app-signature.json``, a signature over
``signed_message`` (its CONTENT manifest but that file's line), and every file must match that
manifest. A FAB runs if either admits it, the hash the SuperLink states for it is the hash of its
bytes, and the run's app id and version are its pyproject's (so Flower loads the copy of exactly
these bytes). Without either key every FAB runs, as in Flower. The ClientApp worker loads this
file by path, before any code of the bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tomllib
import zipfile
from collections.abc import Mapping
from typing import Any

PIN_KEY = "trusted-apps"
KEYS_KEY = "trusted-app-keys"
SIGNATURE_FILE = "app-signature.json"  # Flower packs only some extensions: .json is one
MANIFEST = ".info/CONTENT"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class AppNotTrusted(RuntimeError):
    """This node does not run the app bundle it was sent (one line, for the server)."""


def parse_pins(text: object, key: str = PIN_KEY) -> frozenset[str]:
    """``"a1b2... , c3d4..."`` -> the set of 64-hex entries; ValueError naming the first bad one."""
    what = "a SHA-256 hash" if key == PIN_KEY else "an Ed25519 public key"
    if not isinstance(text, str):
        raise ValueError(f"{key} must be a string of 64-hex-digit entries, got {type(text).__name__}")
    pins = [p.removeprefix("sha256:") for p in re.split(r"[\s,]+", text.strip().lower()) if p]
    for pin in pins:
        if not _HEX64.fullmatch(pin):
            raise ValueError(f"{key}: {pin[:80]!r} is not {what} (64 hex digits)")
    return frozenset(pins)


def signed_message(manifest: str) -> bytes:
    """sha256("prism-flwr app\\n" + the sorted ``path,sha256,bits`` lines of CONTENT but the signature's)."""
    lines = sorted(x for x in manifest.strip().splitlines() if x and not x.startswith(f"{SIGNATURE_FILE},"))
    return hashlib.sha256(("prism-flwr app\n" + "\n".join(lines)).encode()).digest()


def _signed_by(content: bytes, keys: frozenset[str]) -> bool:
    """Every file of the bundle matches its manifest and its signature verifies under one of ``keys``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        manifest = fab.read(MANIFEST).decode("utf-8")
        listed = dict(line.rsplit(",", 2)[:2] for line in manifest.strip().splitlines())
        names = fab.namelist()
        if len(names) != len(set(names)) or set(names) != {*listed, MANIFEST} or SIGNATURE_FILE not in listed:
            return False  # a file the manifest does not cover, or no signature
        if any(hashlib.sha256(fab.read(path)).hexdigest() != digest for path, digest in listed.items()):
            return False
        signature = bytes.fromhex(json.loads(fab.read(SIGNATURE_FILE))["ed25519"])
    for key in keys:
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)).verify(signature, signed_message(manifest))
            return True
        except InvalidSignature:
            continue
    return False


def fab_identity(content: bytes) -> tuple[str, str]:
    """(app id ``publisher/name``, version) as the FAB's pyproject states them (Flower's rule)."""
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        config: dict[str, Any] = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
    return f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}", config["project"][
        "version"
    ]


def _admitted(content: bytes, digest: str, pins: frozenset[str], keys: frozenset[str]) -> bool:
    if digest in pins:
        return True
    try:
        return bool(keys) and _signed_by(content, keys)
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile):  # no or malformed CONTENT or signature
        return False


def check_bundle(
    node_config: Mapping[str, Any], content: bytes, stated_hash: str, fab_id: str, fab_version: str
) -> str | None:
    """The FAB's SHA-256 when this node pins apps and trusts this one; None when it pins none.

    Raises ``AppNotTrusted`` otherwise. ``node_config``: the node's own (never the run config)."""
    if PIN_KEY not in node_config and KEYS_KEY not in node_config:
        return None
    try:
        pins = parse_pins(node_config.get(PIN_KEY, ""))
        keys = parse_pins(node_config.get(KEYS_KEY, ""), KEYS_KEY)
    except ValueError as err:
        raise AppNotTrusted(f"node refuses every app: {err}") from None
    digest = hashlib.sha256(content).hexdigest()
    if not _admitted(content, digest, pins, keys):
        signers = f" nor signed by one of its {KEYS_KEY}" if keys else ""
        raise AppNotTrusted(
            f"node refuses the app: its FAB (sha256 {digest}) is not in this node's {PIN_KEY}{signers}"
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


def sign_app(manifest: str, private_key_pem: bytes) -> tuple[str, str]:
    """(signature file text, public key hex) for a bundle whose CONTENT is ``manifest`` (publisher's step)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(
            "the signing key must be an Ed25519 private key (openssl genpkey -algorithm ed25519)"
        )
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = key.sign(signed_message(manifest)).hex()
    return json.dumps({"ed25519": signature, "public-key": public.hex()}, indent=1) + "\n", public.hex()
