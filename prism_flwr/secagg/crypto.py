"""Building blocks of secure aggregation: keys, key derivation, AEAD, masks, Shamir, bit packing.

Every primitive comes from `cryptography` (X25519, HKDF-SHA256, ChaCha20-Poly1305, ChaCha20) or
pycryptodome (Shamir over GF(2^128)); this module only wires them together and turns a failure
into `SecAggError`. The protocol that uses them is in `secagg.py`, the derivation in
docs/secure-aggregation.md.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DOMAIN = b"prism-secagg/v1 "
KEY_BYTES = 32  # X25519 keys, HKDF outputs, self-mask seeds
SHARE_BYTES = 32  # one Shamir share of a 32-byte secret (two 16-byte halves)
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_NODE_ID = 2**64  # Flower node ids are unsigned 64-bit integers


class SecAggError(ValueError):
    """A message, parameter or request that the protocol refuses (the reason is the message)."""


class FloorRefusal(SecAggError):
    """A round below this node's floor: the node will not take part (about configuration only)."""


class RoundSkipped(SecAggError):
    """Too few clients remain to finish the round safely: no aggregate, never a wrong one."""


def node_bytes(node: int) -> bytes:
    """The fixed 8-byte encoding of a node id, used in every derivation and associated data."""
    if not isinstance(node, int) or isinstance(node, bool) or not 0 <= node < MAX_NODE_ID:
        raise SecAggError(f"node id {node!r} is not an unsigned 64-bit integer")
    return node.to_bytes(8, "big")


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private, public) raw 32-byte strings."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_key_of(private: bytes) -> bytes:
    """The X25519 public key of a raw private key (checks a reconstructed key)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def derive_key(private: bytes, peer_public: bytes, round_id: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 agreement, salted by the round id and labelled by `info`."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        secret = X25519PrivateKey.from_private_bytes(private).exchange(peer)
    except ValueError as error:  # wrong length, or a low-order point giving an all-zero secret
        raise SecAggError(f"key agreement failed: {error}") from None
    return hkdf(secret, round_id, info)


def hkdf(secret: bytes, round_id: bytes, info: bytes) -> bytes:
    """A 32-byte key for one purpose (`info`) in one round (`round_id` as salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=round_id, info=DOMAIN + info).derive(secret)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption with a random nonce, returned as nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """Inverse of `seal`; a truncated, altered or misaddressed blob raises `SecAggError`."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"encrypted share of {len(blob)} bytes is truncated")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggError(
            "encrypted share fails authentication (forged, altered or "
            "addressed to another round, sender or receiver)"
        ) from None


def commitment(round_id: bytes, node: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, so a reconstructed seed can be checked."""
    return hashlib.sha256(DOMAIN + b"seed commitment" + round_id + node_bytes(node) + seed).digest()


def prg(key: bytes, length: int, bits: int) -> np.ndarray:
    """`length` uniform values mod 2^bits (uint16) from the ChaCha20 keystream of `key`.

    One byte per value for bits <= 8, two otherwise: 2^bits divides 2^8 (or 2^16), so keeping the
    low bits of a uniform byte (or word) is exactly uniform. Each key is used for one stream only,
    so the nonce is fixed.
    """
    width = 1 if bits <= 8 else 2
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes(length * width)), np.uint8 if width == 1 else "<u2")
    return raw.astype(np.uint16) & np.uint16((1 << bits) - 1)


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir `threshold`-of-`holders` shares of a 32-byte secret; share i has index i + 1."""
    low = Shamir.split(threshold, holders, secret[:16])
    high = Shamir.split(threshold, holders, secret[16:])
    return [a + b for (_, a), (_, b) in zip(low, high)]


def combine_secret(shares: dict[int, bytes]) -> bytes:
    """The 32-byte secret from exactly `threshold` shares, keyed by their index (>= 1)."""
    low = Shamir.combine([(index, share[:16]) for index, share in shares.items()])
    high = Shamir.combine([(index, share[16:]) for index, share in shares.items()])
    return low + high


def packed_size(length: int, bits: int) -> int:
    """Bytes of `length` values packed at `bits` bits each."""
    return (length * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack values < 2^bits (bits in 1..16) at `bits` bits each, least significant bit first."""
    values = np.asarray(values)
    if not 1 <= bits <= 16 or values.ndim != 1:
        raise SecAggError(f"cannot pack a {values.ndim}-d array at {bits} bits")
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise SecAggError(f"values outside 0..{(1 << bits) - 1} cannot be packed at {bits} bits")
    values = values.astype(np.uint16)
    planes = np.empty((values.size, bits), np.uint8)  # one bit plane per column: a loop over
    for j in range(bits):  # at most 16 columns is faster than broadcasting over all of them
        planes[:, j] = (values >> j) & 1
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack(data: bytes, length: int, bits: int) -> np.ndarray:
    """Inverse of `pack`; a wrong size or non-zero padding bits raise `SecAggError`."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != packed_size(length, bits):
        size = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise SecAggError(
            f"packed vector has {size} bytes, expected "
            f"{packed_size(length, bits)} ({length} values at {bits} bits)"
        )
    flat = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    if flat[length * bits :].any():
        raise SecAggError("packed vector has non-zero padding bits")
    planes = flat[: length * bits].reshape(length, bits)
    values = np.zeros(length, np.uint16)
    for j in range(bits):
        values |= planes[:, j].astype(np.uint16) << j
    return values
