"""Mask codec: a binary mask <-> bytes at 1 bit per weight, with a checked header.

Layout (little endian), 28 header bytes then the payload::

    magic   4s   b"PRSM"
    version B    FORMAT_VERSION
    pad     3s   zero (checked)
    count   Q    number of weights (bits) in the mask
    layout  8s   model-layout fingerprint (``masked.layout_fingerprint``)
    crc32   I    zlib.crc32 of the payload
    payload      numpy.packbits(mask, bitorder="little"), ceil(count / 8) bytes, padding bits 0

The header costs 28 bytes: for the paper's 3,543,616-weight generator the upload is
442,952 + 28 bytes, i.e. 1.00006 bits per weight. Decoding checks every field and raises
``MaskFormatError`` naming what is wrong; nothing malformed ever reaches aggregation.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"PRSM"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sB3sQ8sI")
HEADER_BYTES = _HEADER.size


class MaskFormatError(ValueError):
    """Raised for any mask payload that must not be aggregated."""


def packed_length(count: int) -> int:
    return (count + 7) // 8


def encode_mask(mask: np.ndarray, layout: bytes) -> bytes:
    """Pack a flat boolean (or 0/1) mask into the wire format."""
    mask = np.asarray(mask)
    if mask.ndim != 1:
        raise ValueError(f"mask must be flat, got shape {mask.shape}")
    if len(layout) != 8:
        raise ValueError("layout fingerprint must be 8 bytes")
    payload = np.packbits(mask.astype(bool, copy=False), bitorder="little").tobytes()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, bytes(3), mask.size, layout, zlib.crc32(payload))
    return header + payload


def decode_mask(data: bytes, count: int, layout: bytes) -> np.ndarray:
    """Validate ``data`` against the expected weight count and layout; return the packed bits.

    The result is a ``uint8`` array of ``packed_length(count)`` bytes (bit ``i`` of the mask is
    bit ``i % 8`` of byte ``i // 8``); ``unpack_mask`` turns it into booleans.
    """
    if len(data) < HEADER_BYTES:
        raise MaskFormatError(f"mask payload truncated: {len(data)} bytes, the header alone is {HEADER_BYTES}")
    magic, version, pad, got_count, got_layout, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MaskFormatError(f"not a PRISM mask: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise MaskFormatError(f"unknown mask format version {version}, this build reads {FORMAT_VERSION}")
    if pad != bytes(3):
        raise MaskFormatError("mask header reserved bytes are not zero")
    if got_count != count:
        raise MaskFormatError(f"mask has {got_count} weights, the model has {count}")
    if got_layout != layout:
        raise MaskFormatError(f"mask layout {got_layout.hex()} does not match the model's {layout.hex()}")
    payload = data[HEADER_BYTES:]
    if len(payload) != packed_length(count):
        raise MaskFormatError(f"mask payload is {len(payload)} bytes, expected {packed_length(count)}")
    if zlib.crc32(payload) != crc:
        raise MaskFormatError("mask checksum mismatch: payload corrupted")
    packed = np.frombuffer(payload, dtype=np.uint8)
    spare = packed_length(count) * 8 - count
    if spare and packed[-1] >> (8 - spare):
        raise MaskFormatError("mask padding bits are not zero")
    return packed


def unpack_mask(packed: np.ndarray, count: int) -> np.ndarray:
    """Packed bits (as returned by ``decode_mask``) -> flat boolean mask of ``count`` entries."""
    return np.unpackbits(packed, count=count, bitorder="little").astype(bool)
