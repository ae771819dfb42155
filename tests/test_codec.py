"""Mask codec: round trips (raw and entropy-coded) and every malformed input rejected clearly."""

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_flwr.federated.codec import (
    HEADER_BYTES,
    LEVEL_PROBABILITIES,
    PROB_BITS,
    MaskFormatError,
    byte_distribution,
    decode_mask,
    encode_mask,
    mask_method,
    mask_model,
    mask_model_from_codes,
    packed_length,
    unpack_mask,
)
from prism_flwr.federated.downlink import GRID, quantise, snap_to_grid

LAYOUT = b"\x01\x02\x03\x04\x05\x06\x07\x08"


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1001, 100_003])
def test_round_trip_odd_sizes(n):
    mask = np.random.default_rng(n).random(n) < 0.3
    blob = encode_mask(mask, LAYOUT)
    assert len(blob) == HEADER_BYTES + packed_length(n) and mask_method(blob) == "raw"
    np.testing.assert_array_equal(unpack_mask(decode_mask(blob, n, LAYOUT), n), mask)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_round_trip_property(bits):
    mask = np.array(bits)
    np.testing.assert_array_equal(
        unpack_mask(decode_mask(encode_mask(mask, LAYOUT), mask.size, LAYOUT), mask.size), mask
    )


def _blob(n=37):
    return encode_mask(np.random.default_rng(0).random(n) < 0.5, LAYOUT)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:10], "truncated"),
        (lambda b: b"XXXX" + b[4:], "not a PRISM mask"),
        (lambda b: b[:4] + bytes([9]) + b[5:], "unknown mask format version 9"),
        (lambda b: b[:-1], "payload is 4 bytes, expected 5"),
        (lambda b: b + b"\x00", "payload is 6 bytes, expected 5"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x01]), "checksum mismatch"),
        (lambda b: b[:5] + bytes([1]) + b[6:], "checksum mismatch"),  # the header is covered too
        (lambda b: b[:5] + bytes([7]) + b[6:], "unknown mask coding method 7"),
    ],
)
def test_malformed_is_rejected(mutate, message):
    with pytest.raises(MaskFormatError, match=message):
        decode_mask(mutate(_blob()), 37, LAYOUT)


def test_wrong_count_and_layout():
    with pytest.raises(MaskFormatError, match="mask has 37 weights, the model has 38"):
        decode_mask(_blob(), 38, LAYOUT)
    with pytest.raises(MaskFormatError, match="does not match the model's"):
        decode_mask(_blob(), 37, b"\x00" * 8)


def _v1(payload: bytes, n: int, layout=LAYOUT) -> bytes:
    return struct.pack("<4sB3sQ8sI", b"PRSM", 1, bytes(3), n, layout, zlib.crc32(payload)) + payload


def test_version_1_masks_still_decode():
    mask = np.random.default_rng(3).random(37) < 0.5
    packed = np.packbits(mask, bitorder="little").tobytes()
    np.testing.assert_array_equal(unpack_mask(decode_mask(_v1(packed, 37), 37, LAYOUT), 37), mask)
    with pytest.raises(MaskFormatError, match="checksum mismatch"):
        decode_mask(_v1(packed, 37)[:-1] + bytes([packed[-1] ^ 1]), 37, LAYOUT)


def test_nonzero_padding_bits_are_rejected():
    # 37 bits -> 5 bytes with 3 spare bits; set one and fix the checksum so only padding is wrong.
    payload = bytearray(np.packbits(np.zeros(37, bool), bitorder="little").tobytes())
    payload[-1] |= 0x80
    with pytest.raises(MaskFormatError, match="padding bits"):
        decode_mask(_v1(bytes(payload), 37), 37, LAYOUT)
    head = struct.pack("<4sBB2sQ8sI", b"PRSM", 2, 0, bytes(2), 37, LAYOUT, 0)
    blob = head + struct.pack("<I", zlib.crc32(bytes(payload), zlib.crc32(head))) + bytes(payload)
    with pytest.raises(MaskFormatError, match="padding bits"):
        decode_mask(blob, 37, LAYOUT)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_corruption_never_passes_silently(data):
    blob = bytearray(_blob(200))
    pos = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    blob[pos] ^= flip
    # Any single-byte change is caught (crc32 detects every error burst of <= 32 bits).
    with pytest.raises(MaskFormatError):
        decode_mask(bytes(blob), 200, LAYOUT)


# ---- entropy-coded masks -------------------------------------------------------------------


def _scores(n, seed=0, spread=3.0):
    return (np.random.default_rng(seed).standard_normal(n) * spread).astype(np.float32)


def _sample(model, seed=1):
    return np.random.default_rng(seed).random(model.size) < model.probabilities()


def _cross_entropy_bits(mask, p):
    return float(-np.where(mask, np.log2(p), np.log2(1 - p)).sum())


@pytest.mark.parametrize("n", [1, 7, 9, 1001, 100_003])
def test_coded_round_trip(n):
    model = mask_model(_scores(n, n))
    mask = _sample(model, n + 100)
    blob = encode_mask(mask, LAYOUT, model)
    np.testing.assert_array_equal(unpack_mask(decode_mask(blob, n, LAYOUT, model), n), mask)


def test_coded_size_is_the_cross_entropy():
    """The payload is within 0.2% (+ a few words) of -sum log2 P(bit) under the model."""
    n = 200_000
    model = mask_model(_scores(n, spread=4.0))
    mask = _sample(model)
    blob = encode_mask(mask, LAYOUT, model)
    assert mask_method(blob) == "coded"
    ideal = _cross_entropy_bits(mask, model.probabilities())
    payload_bits = 8 * (len(blob) - HEADER_BYTES)
    assert ideal <= payload_bits + 64 and payload_bits <= 1.002 * ideal + 64 * 32, (payload_bits, ideal)
    assert payload_bits / n < 0.6  # scores of sd 4: far below 1 bit per weight


def test_coding_falls_back_to_raw_when_not_smaller():
    """A mask that contradicts the model would cost ~8 bits/weight coded: it goes raw instead."""
    n = 5000
    model = mask_model(np.full(n, 5.0, np.float32))  # the model says 'almost surely 1'
    mask = np.random.default_rng(0).random(n) < 0.5  # the client sends fair coins
    blob = encode_mask(mask, LAYOUT, model)
    assert mask_method(blob) == "raw" and len(blob) == HEADER_BYTES + packed_length(n)
    np.testing.assert_array_equal(unpack_mask(decode_mask(blob, n, LAYOUT, model), n), mask)


def _coded_blob(n=3000, seed=0):
    model = mask_model(_scores(n, seed))
    blob = encode_mask(_sample(model, seed + 100), LAYOUT, model)
    assert mask_method(blob) == "coded"
    return blob, model


def _refit(blob: bytes, payload: bytes) -> bytes:
    """Same header with a fresh checksum over header + new payload (a 'hostile' but intact blob)."""
    head = blob[: HEADER_BYTES - 4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def test_coded_needs_the_right_model():
    blob, model = _coded_blob()
    with pytest.raises(MaskFormatError, match="no coding model"):
        decode_mask(blob, 3000, LAYOUT)
    other = mask_model(_scores(3000, seed=9))
    with pytest.raises(MaskFormatError, match="coded against global model .*stale or foreign"):
        decode_mask(blob, 3000, LAYOUT, other)


@pytest.mark.parametrize(
    "make_payload, message",
    [
        (lambda p: b"\x01\x00\x00\x00" + p, "trailing data"),  # a word below the stack
        (lambda p: p + b"\x00", "whole number of 32-bit words"),
        (lambda p: bytes(packed_length(3000) + 4), "coded, more than the raw"),
    ],
)
def test_hostile_coded_payloads_are_refused(make_payload, message):
    blob, model = _coded_blob()
    with pytest.raises(MaskFormatError, match=message):
        decode_mask(_refit(blob, make_payload(blob[HEADER_BYTES:])), 3000, LAYOUT, model)


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=4, max_size=375).filter(lambda b: len(b) % 4 == 0))
def test_arbitrary_coded_payload_decodes_or_is_refused(payload):
    """Any intact-checksum payload either decodes to a mask of the right size or raises
    MaskFormatError; nothing else escapes, and the work is bounded by the count."""
    blob, model = _coded_blob()
    try:
        packed = decode_mask(_refit(blob, payload), 3000, LAYOUT, model)
    except MaskFormatError:
        return
    assert packed.dtype == np.uint8 and packed.size == packed_length(3000)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_corruption_of_coded_masks_never_passes_silently(data):
    blob, model = _coded_blob(400)
    blob = bytearray(blob)
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(MaskFormatError):
        decode_mask(bytes(blob), 400, LAYOUT, model)


def test_model_is_the_same_from_float32_scores_or_from_the_8_bit_broadcast():
    scores = _scores(10_000)
    a = mask_model(scores)
    b = mask_model(snap_to_grid(scores))
    c = mask_model_from_codes(quantise(scores))
    assert a.fingerprint == b.fingerprint == c.fingerprint
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.slot, c.slot)


def test_grouped_fast_path_counts_the_same():
    """Server fast path: masks decoded into the grouped layout (coded as they come, raw ones
    moved there), counted there, counts mapped back once: equal to counting in weight order."""
    from prism_flwr.federated.aggregation import count_ones

    n = 20_011
    model = mask_model(_scores(n, seed=4))
    masks = [_sample(model, s) for s in range(5)] + [np.random.default_rng(9).random(n) < 0.5]
    blobs = [encode_mask(m, LAYOUT, model) for m in masks[:5]] + [encode_mask(masks[5], LAYOUT)]
    assert [mask_method(b) for b in blobs] == ["coded"] * 5 + ["raw"]
    grouped = [decode_mask(b, n, LAYOUT, model, grouped=True) for b in blobs]
    assert all(g.size == model.grouped_bits // 8 for g in grouped) and model.grouped_bits <= n + 7 * 256
    counts, k = count_ones(grouped, model.grouped_bits)
    np.testing.assert_array_equal(model.ungroup_counts(counts), np.sum(masks, axis=0))
    plain = [decode_mask(b, n, LAYOUT, model) for b in blobs]
    np.testing.assert_array_equal(count_ones(plain, n)[0], np.sum(masks, axis=0))
    with pytest.raises(ValueError, match="needs the coding model"):
        decode_mask(blobs[5], n, LAYOUT, grouped=True)


def test_level_probabilities_cannot_differ_between_machines():
    """P[c] is sigmoid(GRID[c]) rounded to 2^-32; a machine whose exp differs in the last ulp
    still rounds to the same value because every level is far from a rounding midpoint."""
    x = 1.0 / (1.0 + np.exp(-GRID.astype(np.float64))) * 2.0**PROB_BITS
    margin = np.abs((x - np.floor(x)) - 0.5)
    assert margin.min() > 1e-4  # a relative error of 1e-16 moves x by under 1e-6
    assert LEVEL_PROBABILITIES.min() > 0.002 and LEVEL_PROBABILITIES.max() < 0.998
    np.testing.assert_array_equal(LEVEL_PROBABILITIES, 1 - LEVEL_PROBABILITIES[::-1])  # symmetric grid
    np.testing.assert_array_equal(LEVEL_PROBABILITIES, np.round(x) / 2.0**PROB_BITS)


def test_byte_distribution_is_the_product_of_bits():
    d = byte_distribution(0.2)
    assert d.sum() == pytest.approx(1.0, abs=1e-12)
    assert d[0] == pytest.approx(0.8**8) and d[255] == pytest.approx(0.2**8)
    assert d[0b101] == pytest.approx(0.2**2 * 0.8**6)


def test_coded_bytes_are_pinned():
    """Client and server must code identically: a constriction (or grid) change that alters the
    bytes would make old and new builds decode each other's masks wrongly. Inputs use no RNG."""
    n = 10_007
    i = np.arange(n)
    scores = np.linspace(-5, 5, n).astype(np.float32)
    mask = ((i * 7919) % 1000) < (1000 / (1 + np.exp(-scores.astype(np.float64))))
    blob = encode_mask(mask, b"LAYOUT01", mask_model(scores))
    assert (len(blob), zlib.crc32(blob)) == (616, 0x7AC5B73C)
