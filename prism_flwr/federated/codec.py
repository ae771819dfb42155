"""Mask codec: a binary mask <-> bytes, raw (1 bit per weight) or entropy-coded, with checks.

A mask is coded against the round's global scores (each weight's grid level picks its coding
probability; weights grouped by level, 8 bits per ANS symbol), so it costs about the client's
theta entropy plus its KL to the global theta, and never more than raw. Decoding checks every
header field, the checksum and the coding model, and raises ``MaskFormatError`` naming what is
wrong. Format versions 2 (written) and 1 (still read): docs/wire-format.md.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from prism_flwr.federated.downlink import GRID, LEVELS, codes_fingerprint, quantise

MAGIC = b"PRSM"
FORMAT_VERSION = 2
RAW, CODED = 0, 1
_HEADER = struct.Struct("<4sBB2sQ8sII")
HEADER_BYTES = _HEADER.size
_HEADER_V1 = struct.Struct("<4sB3sQ8sI")
HEADER_BYTES_V1 = _HEADER_V1.size
PROB_BITS = 32  # coding probabilities are multiples of 2^-PROB_BITS


class MaskFormatError(ValueError):
    """Raised for any mask payload that must not be aggregated."""


def packed_length(count: int) -> int:
    return (count + 7) // 8


def _level_probabilities() -> np.ndarray:
    """``P[c] = round(sigmoid(GRID[c]) * 2^32) / 2^32`` (float64), the coding probability of a 1."""
    p = 1.0 / (1.0 + np.exp(-GRID.astype(np.float64)))
    return np.round(p * 2.0**PROB_BITS) / 2.0**PROB_BITS


LEVEL_PROBABILITIES = _level_probabilities()
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)])


def byte_distribution(p: float) -> np.ndarray:
    """P(byte) of 8 i.i.d. Bernoulli(p) bits (bit j of the byte = the j-th weight), float64.

    Built from products only (no ``pow``/``exp``), so every machine computes the same numbers.
    """
    one, zero = np.ones(256), np.ones(256)
    for j in range(8):
        bit = (np.arange(256) >> j) & 1
        one = np.where(bit == 1, one * p, one)
        zero = np.where(bit == 0, zero * (1.0 - p), zero)
    return one * zero


@lru_cache(maxsize=LEVELS)
def _group_model(code: int):
    import constriction

    return constriction.stream.model.Categorical(
        byte_distribution(float(LEVEL_PROBABILITIES[code])), perfect=False
    )


@lru_cache(maxsize=LEVELS)
def _bit_model(code: int):
    import constriction

    p = float(LEVEL_PROBABILITIES[code])
    return constriction.stream.model.Categorical(np.array([1.0 - p, p]), perfect=False)


@dataclass(frozen=True, eq=False)
class MaskModel:
    """Per-weight coding probabilities both sides derive from the broadcast global scores.

    ``codes[i]`` is weight ``i``'s grid level (probability ``LEVEL_PROBABILITIES[codes[i]]``);
    ``fingerprint`` is crc32 of ``codes``. The *grouped layout* puts the weights of level ``c``
    (in their original order) at bits ``8 offsets[c] ..`` with each group padded to whole bytes:
    ``slot[i]`` is weight ``i``'s bit in it, ``sizes[c]`` the group sizes, ``grouped_bits`` the
    layout's length (at most ``N + 7 * 256``). A group's byte symbols are then packed bits of
    the layout as they are, so a server can count ones there and map the counts back once.
    """

    codes: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    slot: np.ndarray
    fingerprint: int

    @property
    def size(self) -> int:
        return self.codes.size

    @property
    def grouped_bits(self) -> int:
        return int(self.offsets[-1]) * 8

    def probabilities(self) -> np.ndarray:
        """Per-weight probability of a 1 under the model (float64)."""
        return LEVEL_PROBABILITIES[self.codes]

    def to_grouped(self, packed: np.ndarray) -> np.ndarray:
        """Packed bits in weight order -> packed bits in the grouped layout (padding bits 0)."""
        grouped = np.zeros(self.grouped_bits, dtype=np.uint8)
        grouped[self.slot] = np.unpackbits(packed, count=self.size, bitorder="little")
        return np.packbits(grouped, bitorder="little")

    def from_grouped(self, packed: np.ndarray) -> np.ndarray:
        """Packed bits in the grouped layout -> packed bits in weight order."""
        bits = np.unpackbits(packed, count=self.grouped_bits, bitorder="little")[self.slot]
        return np.packbits(bits, bitorder="little")

    def ungroup_counts(self, counts: np.ndarray) -> np.ndarray:
        """Per-position counts over the grouped layout (``count_ones(.., grouped_bits)``) ->
        per-weight counts in weight order."""
        if counts.shape != (self.grouped_bits,):
            raise ValueError(f"counts have shape {counts.shape}, the grouped layout {self.grouped_bits} bits")
        return counts[self.slot]


def mask_model_from_codes(codes: np.ndarray) -> MaskModel:
    codes = np.ascontiguousarray(codes)
    if codes.ndim != 1 or codes.dtype != np.uint8:
        raise ValueError(f"codes must be a flat uint8 array, got {codes.dtype} {codes.shape}")
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=LEVELS)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    offsets = np.concatenate([[0], np.cumsum((sizes + 7) // 8)])
    rank = np.empty(codes.size, dtype=np.int64)  # position of each weight within its group
    rank[order] = np.arange(codes.size) - np.repeat(starts, sizes)
    slot = offsets[codes].astype(np.int64) * 8 + rank
    return MaskModel(codes, sizes, offsets, slot, codes_fingerprint(codes))


def mask_model(scores: np.ndarray) -> MaskModel:
    """THE shared function: the global scores as broadcast (float32) -> the coding model.

    The client calls it on the scores it received, the server on the scores it sent; the grid
    codes involve only IEEE-exact float32 clip/add/multiply/round, so both get the same model.
    """
    return mask_model_from_codes(quantise(np.asarray(scores, dtype=np.float32)))


def _header(method: int, count: int, layout: bytes, model: int, payload: bytes) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, method, bytes(2), count, layout, model, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


def _encode_coded(packed: np.ndarray, model: MaskModel) -> bytes:
    import constriction

    grouped = model.to_grouped(packed)
    coder = constriction.stream.stack.AnsCoder()
    for c in range(LEVELS - 1, -1, -1):  # ANS is a stack: encode backwards, decode forwards
        size, off = int(model.sizes[c]), int(model.offsets[c])
        full, rem = divmod(size, 8)
        if rem:  # the group's last bits one at a time (decoded last, so encoded first)
            last = np.unpackbits(grouped[off + full : off + full + 1], count=rem, bitorder="little")
            coder.encode_reverse(last.astype(np.int32), _bit_model(c))
        if full:
            coder.encode_reverse(grouped[off : off + full].astype(np.int32), _group_model(c))
    return coder.get_compressed().astype("<u4").tobytes()


def encode_mask(mask: np.ndarray, layout: bytes, model: MaskModel | None = None) -> bytes:
    """Flat boolean (or 0/1) mask -> wire bytes: coded against ``model`` when that is smaller."""
    mask = np.asarray(mask)
    if mask.ndim != 1:
        raise ValueError(f"mask must be flat, got shape {mask.shape}")
    if len(layout) != 8:
        raise ValueError("layout fingerprint must be 8 bytes")
    packed = np.packbits(mask.astype(bool, copy=False), bitorder="little")
    raw = packed.tobytes()
    if model is not None:
        if model.size != mask.size:
            raise ValueError(f"coding model has {model.size} weights, the mask {mask.size}")
        coded = _encode_coded(packed, model)
        if len(coded) < len(raw):
            return _header(CODED, mask.size, layout, model.fingerprint, coded) + coded
    return _header(RAW, mask.size, layout, 0, raw) + raw


def _decode_coded(payload: bytes, model: MaskModel) -> np.ndarray:
    """ANS words -> packed bits in the model's grouped layout (padding bits 0)."""
    import constriction

    if len(payload) % 4:  # empty is legal: ANS codes leading zero bytes into an empty stack for free
        raise MaskFormatError(
            f"coded mask payload of {len(payload)} bytes is not a whole number of 32-bit words"
        )
    words = np.frombuffer(payload, "<u4").astype(np.uint32)
    grouped = np.zeros(int(model.offsets[-1]), dtype=np.uint8)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        for c in range(LEVELS):
            size, off = int(model.sizes[c]), int(model.offsets[c])
            full, rem = divmod(size, 8)
            if full:
                grouped[off : off + full] = coder.decode(_group_model(c), full)
            if rem:
                grouped[off + full] = np.packbits(coder.decode(_bit_model(c), rem) != 0, bitorder="little")[0]
        empty = coder.is_empty()
    except Exception as err:  # constriction raises its own types for malformed streams
        raise MaskFormatError(f"coded mask does not decode: {err}") from None
    if not empty:
        raise MaskFormatError("coded mask has trailing data")
    return grouped


def decode_mask(
    data: bytes, count: int, layout: bytes, model: MaskModel | None = None, grouped: bool = False
) -> np.ndarray:
    """Validate ``data`` against the expected weight count and layout; return the packed bits.

    The result is a ``uint8`` array of ``packed_length(count)`` bytes (bit ``i`` of the mask is
    bit ``i % 8`` of byte ``i // 8``); ``unpack_mask`` turns it into booleans. A coded mask
    needs ``model``, the coding model of the global scores this round's clients received.
    ``grouped=True`` (needs ``model``) returns the bits in the model's grouped layout instead
    (``model.grouped_bits`` bits, raw masks moved into it): the server's fast path, where
    ``count_ones(.., model.grouped_bits)`` then ``model.ungroup_counts`` replace one
    permutation per client by one per round.
    """
    if grouped and model is None:
        raise ValueError("grouped=True needs the coding model")
    packed, coded = _decode_checked(data, count, layout, model)
    if grouped:
        return packed if coded else model.to_grouped(packed)
    return model.from_grouped(packed) if coded else packed


def _decode_checked(
    data: bytes, count: int, layout: bytes, model: MaskModel | None
) -> tuple[np.ndarray, bool]:
    data = bytes(data)
    if len(data) < 5:
        raise MaskFormatError(
            f"mask payload truncated: {len(data)} bytes, the header alone is {HEADER_BYTES}"
        )
    if data[:4] != MAGIC:
        raise MaskFormatError(f"not a PRISM mask: magic {data[:4]!r}, expected {MAGIC!r}")
    if data[4] == 1:
        return _decode_v1(data, count, layout), False
    if data[4] != FORMAT_VERSION:
        raise MaskFormatError(
            f"unknown mask format version {data[4]}, this build reads 1 and {FORMAT_VERSION}"
        )
    if len(data) < HEADER_BYTES:
        raise MaskFormatError(
            f"mask payload truncated: {len(data)} bytes, the header alone is {HEADER_BYTES}"
        )
    _, _, method, pad, got_count, got_layout, got_model, crc = _HEADER.unpack_from(data)
    if pad != bytes(2):
        raise MaskFormatError("mask header reserved bytes are not zero")
    if method not in (RAW, CODED):
        raise MaskFormatError(f"unknown mask coding method {method}")
    if got_count != count:
        raise MaskFormatError(f"mask has {got_count} weights, the model has {count}")
    if got_layout != layout:
        raise MaskFormatError(f"mask layout {got_layout.hex()} does not match the model's {layout.hex()}")
    payload = data[HEADER_BYTES:]
    raw_len = packed_length(count)
    if (method == RAW and len(payload) != raw_len) or (method == CODED and len(payload) > raw_len):
        kind = "expected" if method == RAW else "coded, more than the raw"
        raise MaskFormatError(f"mask payload is {len(payload)} bytes, {kind} {raw_len}")
    if zlib.crc32(payload, zlib.crc32(data[: HEADER_BYTES - 4])) != crc:
        raise MaskFormatError("mask checksum mismatch: header or payload corrupted")
    if method == RAW:
        if got_model != 0:
            raise MaskFormatError("raw mask names a coding model")
        return _check_padding(np.frombuffer(payload, dtype=np.uint8), count), False
    if model is None:
        raise MaskFormatError("mask is entropy-coded but no coding model was given to decode it")
    if model.size != count:
        raise MaskFormatError(f"coding model has {model.size} weights, the mask {count}")
    if got_model != model.fingerprint:
        raise MaskFormatError(
            f"mask was coded against global model {got_model:08x}, this round's is "
            f"{model.fingerprint:08x} (stale or foreign scores)"
        )
    return _decode_coded(payload, model), True


def _check_padding(packed: np.ndarray, count: int) -> np.ndarray:
    spare = packed_length(count) * 8 - count
    if spare and packed[-1] >> (8 - spare):
        raise MaskFormatError("mask padding bits are not zero")
    return packed


def _decode_v1(data: bytes, count: int, layout: bytes) -> np.ndarray:
    if len(data) < HEADER_BYTES_V1:
        raise MaskFormatError(
            f"mask payload truncated: {len(data)} bytes, the header alone is {HEADER_BYTES_V1}"
        )
    _, _, pad, got_count, got_layout, crc = _HEADER_V1.unpack_from(data)
    if pad != bytes(3):
        raise MaskFormatError("mask header reserved bytes are not zero")
    if got_count != count:
        raise MaskFormatError(f"mask has {got_count} weights, the model has {count}")
    if got_layout != layout:
        raise MaskFormatError(f"mask layout {got_layout.hex()} does not match the model's {layout.hex()}")
    payload = data[HEADER_BYTES_V1:]
    if len(payload) != packed_length(count):
        raise MaskFormatError(f"mask payload is {len(payload)} bytes, expected {packed_length(count)}")
    if zlib.crc32(payload) != crc:
        raise MaskFormatError("mask checksum mismatch: payload corrupted")
    return _check_padding(np.frombuffer(payload, dtype=np.uint8), count)


def mask_method(data: bytes) -> str:
    """``"raw"`` or ``"coded"`` as the header says (no checks: call after ``decode_mask``)."""
    return "coded" if len(data) > 5 and data[4] == FORMAT_VERSION and data[5] == CODED else "raw"


def unpack_mask(packed: np.ndarray, count: int) -> np.ndarray:
    """Packed bits (as returned by ``decode_mask``) -> flat boolean mask of ``count`` entries."""
    return np.unpackbits(packed, count=count, bitorder="little").astype(bool)
