"""Long-term identities of the federation's nodes: an Ed25519 signing key per node and a roster
of every member's public key, both distributed out of band (never by the server).

A node signs its key advert and the survivor set it saw; a node with an ``Identity`` accepts an
advert or a survivor set only when its signature verifies under a key in its roster. Files: the
private key as PKCS#8 PEM (mode 0600), the roster as JSON ``{"format": ROSTER_FORMAT, "members":
{name: hex public key}}``; names are labels for people, the key is the identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from prism_flwr.secagg.crypto import SecAggError

ROSTER_FORMAT = "prism-secagg-roster/1"
PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class Identity:
    """This node's signing key and the roster it checks others against."""

    private: bytes  # raw 32-byte Ed25519 private key
    roster: frozenset[bytes]  # raw 32-byte public keys of the federation's members

    def __post_init__(self):
        if self.public not in self.roster:
            raise SecAggError("this node's own public key is not in its roster")

    @property
    def public(self) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).public_key().public_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(message)

    def check(self, signer: bytes, signature: bytes, message: bytes, what: str) -> None:
        """Refuse unless ``signer`` is a roster member and ``signature`` is its signature of ``message``."""
        if not signer:
            raise SecAggError(f"{what} is not signed, and this node accepts only signed messages")
        if signer not in self.roster:
            raise SecAggError(f"{what} is signed by a key that is not in this node's roster")
        verify(signer, signature, message, what)


def verify(signer: bytes, signature: bytes, message: bytes, what: str) -> None:
    """Refuse unless ``signature`` is ``signer``'s Ed25519 signature of ``message``."""
    if not (isinstance(signer, bytes) and len(signer) == PUBLIC_BYTES):
        raise SecAggError(f"{what}: signer key must be {PUBLIC_BYTES} bytes")
    if not (isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
        raise SecAggError(f"{what}: signature must be {SIGNATURE_BYTES} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(signer).verify(signature, message)
    except InvalidSignature:
        raise SecAggError(f"{what}: signature does not verify") from None


def read_roster(path: str | Path) -> frozenset[bytes]:
    """The public keys of a roster file; any malformed entry refuses the whole file."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") != ROSTER_FORMAT or not isinstance(data.get("members"), dict):
            raise ValueError(f"not a {ROSTER_FORMAT} file")
        keys = [bytes.fromhex(value) for value in data["members"].values()]
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise SecAggError(f"roster {path}: {err}") from None
    if not keys or any(len(k) != PUBLIC_BYTES for k in keys) or len(set(keys)) != len(keys):
        raise SecAggError(f"roster {path}: needs unique {PUBLIC_BYTES}-byte public keys")
    return frozenset(keys)


def read_private_key(path: str | Path) -> bytes:
    """The raw Ed25519 private key of a PKCS#8 PEM file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise SecAggError(f"signing key {path}: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggError(f"signing key {path}: not an Ed25519 key")
    return key.private_bytes_raw()


def load_identity(key_path: str | Path, roster_path: str | Path) -> Identity:
    return Identity(read_private_key(key_path), read_roster(roster_path))


def write_federation(out: str | Path, nodes: int, prefix: str = "node-") -> tuple[list[Path], Path]:
    """``nodes`` fresh key files ``<prefix><i>.key`` (0600) and ``roster.json`` under ``out``;
    refuses to overwrite an existing key or roster."""
    if nodes < 1:
        raise SecAggError("a federation needs at least one node")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys, members = [], {}
    targets = [out / f"{prefix}{i}.key" for i in range(nodes)] + [out / "roster.json"]
    if existing := [str(p) for p in targets if p.exists()]:
        raise SecAggError(f"refusing to overwrite {existing[0]}")
    for i in range(nodes):
        key = Ed25519PrivateKey.generate()
        path = targets[i]
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        keys.append(path)
        members[f"{prefix}{i}"] = key.public_key().public_bytes_raw().hex()
    targets[-1].write_text(json.dumps({"format": ROSTER_FORMAT, "members": members}, indent=1) + "\n")
    return keys, targets[-1]
