"""Compact downlink: the global scores on an 8-bit grid, and their wire format (full state or delta).

The server's state *is* the grid: 256 levels uniform in score space over [-6, 6], reached by
unbiased stochastic rounding, so the server and every client hold the same float32 numbers. The
codes travel entropy-coded with their histogram (``pack_scores``) or as a per-context delta from
the state a client holds (``pack_delta``; ``pack_update`` sends the smaller), with CRC32 checks on
both sides. Grid, byte layout and costs: docs/wire-format.md.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SCORE_CLIP = 6.0
LEVELS = 256
STEP = 2.0 * SCORE_CLIP / (LEVELS - 1)
GRID = (np.arange(LEVELS, dtype=np.float64) * STEP - SCORE_CLIP).astype(np.float32)
_INV_STEP = np.float32(1.0 / STEP)
_ON_GRID_TOL = 1e-3  # in grid steps: a value this close to a level is that level

MAGIC = b"PRSD"
DOWNLINK_VERSION = 1
RAW, CODED, DELTA = 0, 1, 2
_HEADER = struct.Struct("<4sBB2sQI")
HEADER_BYTES = _HEADER.size


class DownlinkFormatError(ValueError):
    """Raised for any downlink payload that must not be loaded as global scores."""


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be flat, got shape {scores.shape}")
    scores = scores.astype(np.float32, copy=False)
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores


def quantise(scores: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Flat float scores -> uint8 grid codes (nearest level, or stochastic rounding with ``rng``)."""
    x = (np.clip(_check_scores(scores), -SCORE_CLIP, SCORE_CLIP) + np.float32(SCORE_CLIP)) * _INV_STEP
    if rng is None:
        return np.clip(np.rint(x), 0, LEVELS - 1).astype(np.uint8)
    lo = np.floor(x)
    frac = x - lo
    up = rng.random(x.shape, dtype=np.float32) < frac
    up = np.where(frac < _ON_GRID_TOL, False, np.where(frac > 1 - _ON_GRID_TOL, True, up))
    return np.clip(lo + up, 0, LEVELS - 1).astype(np.uint8)


def dequantise(codes: np.ndarray) -> np.ndarray:
    """uint8 grid codes -> float32 scores (a table lookup: identical on every machine)."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    return GRID[codes]


def snap_to_grid(scores: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """The server's new state after aggregation: ``dequantise(quantise(scores, rng))``."""
    return dequantise(quantise(scores, rng))


def is_on_grid(scores: np.ndarray) -> bool:
    s = np.asarray(scores, dtype=np.float32)
    return bool(np.array_equal(dequantise(quantise(s)), s))


def codes_fingerprint(codes: np.ndarray) -> int:
    """crc32 of the codes: names one global state (the uplink codec's model check uses it)."""
    return zlib.crc32(np.ascontiguousarray(codes, dtype=np.uint8).data)


def _histogram_model(hist: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(hist.astype(np.float64) / float(hist.sum()), perfect=False)


def _encode_codes(codes: np.ndarray) -> bytes:
    import constriction

    hist = np.bincount(codes, minlength=LEVELS).astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(codes.astype(np.int32), _histogram_model(hist))
    return hist.astype("<u4").tobytes() + coder.get_compressed().astype("<u4").tobytes()


def _decode_codes(payload: bytes, count: int) -> np.ndarray:
    import constriction

    if len(payload) < 4 * LEVELS or len(payload) % 4:
        raise DownlinkFormatError(f"coded downlink payload of {len(payload)} bytes is malformed")
    hist = np.frombuffer(payload[: 4 * LEVELS], "<u4").astype(np.int64)
    if hist.sum() != count:
        raise DownlinkFormatError(f"downlink histogram counts {hist.sum()} codes, expected {count}")
    words = np.frombuffer(payload[4 * LEVELS :], "<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        codes = coder.decode(_histogram_model(hist), count)
        empty = coder.is_empty()
    except Exception as err:  # constriction raises its own types for malformed streams
        raise DownlinkFormatError(f"coded downlink does not decode: {err}") from None
    if not empty:
        raise DownlinkFormatError("coded downlink has trailing data")
    codes = codes.astype(np.uint8)
    if not np.array_equal(np.bincount(codes, minlength=LEVELS), hist):
        raise DownlinkFormatError("coded downlink does not match its histogram")
    return codes


def pack_scores(codes: np.ndarray, method: str = "auto") -> bytes:
    """Grid codes -> wire bytes; ``method`` ``"raw"``, ``"coded"`` or ``"auto"`` (the smaller)."""
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype != np.uint8:
        raise ValueError(f"codes must be a flat uint8 array, got {codes.dtype} {codes.shape}")
    if method not in ("auto", "raw", "coded"):
        raise ValueError(f"method must be 'auto', 'raw' or 'coded', got {method!r}")
    payload, kind = codes.tobytes(), RAW
    if method != "raw":
        coded = _encode_codes(codes)
        if method == "coded" or len(coded) < len(payload):
            payload, kind = coded, CODED
    head = _HEADER.pack(MAGIC, DOWNLINK_VERSION, kind, bytes(2), codes.size, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


CONTEXT_BITS = (0, 2, 4, 6, 8)  # the delta encoder's choices: 1 to 256 contexts


def _context(base: np.ndarray, bits: int) -> np.ndarray:
    """uint8 context of each weight: the top ``bits`` bits of its base code (uint8 sorts by radix)."""
    return base >> np.uint8(8 - bits) if bits else np.zeros(base.size, np.uint8)


def _coded_bits(hist: np.ndarray) -> float:
    """Ideal code length of symbols with per-row histograms ``hist`` (contexts x 256), in bits."""
    rows = hist.sum(axis=1, keepdims=True)
    p = np.where(hist > 0, hist / np.maximum(rows, 1), 1.0)
    return float(-(hist * np.log2(p)).sum())


def _encode_delta(d: np.ndarray, base: np.ndarray) -> bytes:
    import constriction

    best = None
    for bits in CONTEXT_BITS:  # pick the context count with the smallest estimated size
        ctx = _context(base, bits)
        hist = np.bincount(ctx.astype(np.intp) * LEVELS + d, minlength=(1 << bits) * LEVELS).reshape(
            1 << bits, LEVELS
        )
        size = _coded_bits(hist) / 8 + 5 * np.count_nonzero(hist) + 2 * (1 << bits)
        if best is None or size < best[0]:
            best = (size, bits, ctx, hist)
    _, bits, ctx, hist = best
    tables = bytearray([bits])
    for row in hist:
        nz = np.flatnonzero(row)
        tables += struct.pack("<H", nz.size) + nz.astype(np.uint8).tobytes() + row[nz].astype("<u4").tobytes()
    order = np.argsort(ctx, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(hist.sum(axis=1))])
    coder = constriction.stream.stack.AnsCoder()
    for k in range((1 << bits) - 1, -1, -1):  # a stack: encode the last context first
        if bounds[k + 1] > bounds[k]:
            coder.encode_reverse(
                d[order[bounds[k] : bounds[k + 1]]].astype(np.int32), _histogram_model(hist[k])
            )
    return bytes(tables) + coder.get_compressed().astype("<u4").tobytes()


def _decode_delta(payload: bytes, base: np.ndarray) -> np.ndarray:
    import constriction

    if not payload or payload[0] not in CONTEXT_BITS:
        raise DownlinkFormatError("delta downlink names an unknown context count")
    bits, pos = payload[0], 1
    ctx = _context(base, bits)
    sizes = np.bincount(ctx, minlength=1 << bits)
    hist = np.zeros((1 << bits, LEVELS), np.int64)
    for k in range(1 << bits):
        if pos + 2 > len(payload):
            raise DownlinkFormatError("delta downlink histograms truncated")
        (nnz,) = struct.unpack_from("<H", payload, pos)
        syms = np.frombuffer(payload, np.uint8, nnz, pos + 2) if pos + 2 + 5 * nnz <= len(payload) else None
        if syms is None or nnz > LEVELS:
            raise DownlinkFormatError("delta downlink histograms truncated")
        counts = np.frombuffer(payload, "<u4", nnz, pos + 2 + nnz).astype(np.int64)
        if (nnz and (np.any(np.diff(syms.astype(int)) <= 0) or counts.min() < 1)) or counts.sum() != sizes[k]:
            raise DownlinkFormatError(f"delta downlink histogram {k} does not fit the base scores")
        hist[k, syms] = counts
        pos += 2 + 5 * nnz
    if (len(payload) - pos) % 4:
        raise DownlinkFormatError("delta downlink words are not whole 32-bit words")
    words = np.frombuffer(payload[pos:], "<u4").astype(np.uint32)
    order = np.argsort(ctx, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    d = np.empty(base.size, np.uint8)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        for k in range(1 << bits):
            if sizes[k]:
                part = coder.decode(_histogram_model(hist[k]), int(sizes[k])).astype(np.uint8)
                if not np.array_equal(np.bincount(part, minlength=LEVELS), hist[k]):
                    raise DownlinkFormatError(f"delta downlink context {k} does not match its histogram")
                d[order[bounds[k] : bounds[k + 1]]] = part
        empty = coder.is_empty()
    except DownlinkFormatError:
        raise
    except Exception as err:  # constriction raises its own types for malformed streams
        raise DownlinkFormatError(f"delta downlink does not decode: {err}") from None
    if not empty:
        raise DownlinkFormatError("delta downlink has trailing data")
    return d


def pack_delta(codes: np.ndarray, base: np.ndarray) -> bytes:
    """The new grid codes as a coded change from ``base``, the codes the receiver already holds."""
    codes, base = np.asarray(codes), np.asarray(base)
    for name, a in (("codes", codes), ("base", base)):
        if a.ndim != 1 or a.dtype != np.uint8:
            raise ValueError(f"{name} must be a flat uint8 array, got {a.dtype} {a.shape}")
    if codes.size != base.size:
        raise ValueError(f"codes have {codes.size} entries, base {base.size}")
    payload = struct.pack("<II", codes_fingerprint(base), codes_fingerprint(codes)) + _encode_delta(
        codes - base, base
    )
    head = _HEADER.pack(MAGIC, DOWNLINK_VERSION, DELTA, bytes(2), codes.size, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def pack_update(codes: np.ndarray, base: np.ndarray | None) -> bytes:
    """What the server sends a client: the delta from ``base`` (the state that client holds)
    when that is smaller than the full state, else the full state; ``base=None``: full state."""
    full = pack_scores(codes)
    if base is None:
        return full
    delta = pack_delta(codes, base)
    return delta if len(delta) < len(full) else full


def unpack_scores(data: bytes, count: int, base: np.ndarray | None = None) -> np.ndarray:
    """Check ``data`` against the expected score count; return the uint8 codes.

    ``dequantise`` of the result is the global state as the server holds it. A delta needs
    ``base``, the codes this receiver holds (refused, naming both checksums, when they are not
    the ones the sender based it on). Decoding work is bounded by ``count``: a payload longer
    than the raw codes (plus the histogram) is refused before any decoding.
    """
    data = bytes(data)
    if len(data) < HEADER_BYTES:
        raise DownlinkFormatError(
            f"downlink truncated: {len(data)} bytes, the header alone is {HEADER_BYTES}"
        )
    magic, version, kind, pad, got_count, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DownlinkFormatError(f"not PRISM downlink scores: magic {magic!r}, expected {MAGIC!r}")
    if version != DOWNLINK_VERSION:
        raise DownlinkFormatError(f"unknown downlink version {version}, this build reads {DOWNLINK_VERSION}")
    if pad != bytes(2):
        raise DownlinkFormatError("downlink header reserved bytes are not zero")
    if kind not in (RAW, CODED, DELTA):
        raise DownlinkFormatError(f"unknown downlink method {kind}")
    if got_count != count:
        raise DownlinkFormatError(f"downlink has {got_count} scores, the model has {count}")
    payload = data[HEADER_BYTES:]
    limit = count + (4 * LEVELS + 4 if kind == CODED else (1 << max(CONTEXT_BITS)) * (2 + 5 * LEVELS) + 16)
    if len(payload) > limit or (kind == RAW and len(payload) != count):
        raise DownlinkFormatError(
            f"downlink payload is {len(payload)} bytes, expected {count} or fewer coded"
        )
    if zlib.crc32(payload, zlib.crc32(data[: HEADER_BYTES - 4])) != crc:
        raise DownlinkFormatError("downlink checksum mismatch: header or payload corrupted")
    if kind == RAW:
        return np.frombuffer(payload, np.uint8).copy()
    if kind == CODED:
        return _decode_codes(payload, count)
    if len(payload) < 8:
        raise DownlinkFormatError("delta downlink truncated")
    want_base, want_new = struct.unpack_from("<II", payload)
    if base is None:
        raise DownlinkFormatError("downlink is a delta but this receiver holds no previous scores")
    base = np.asarray(base)
    if base.dtype != np.uint8 or base.shape != (count,) or codes_fingerprint(base) != want_base:
        raise DownlinkFormatError(
            f"downlink delta is based on scores {want_base:08x}, this receiver holds "
            f"{codes_fingerprint(base) if base.dtype == np.uint8 else 0:08x}: needs the full state"
        )
    codes = base + _decode_delta(payload[8:], base)
    if codes_fingerprint(codes) != want_new:
        raise DownlinkFormatError("downlink delta does not rebuild the sender's scores (checksum mismatch)")
    return codes
