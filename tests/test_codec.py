"""Mask codec: round trips and every malformed input rejected with a clear error."""

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prism_flwr.codec import (HEADER_BYTES, MaskFormatError, decode_mask, encode_mask, packed_length,
                              unpack_mask)

LAYOUT = b"\x01\x02\x03\x04\x05\x06\x07\x08"


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1001, 100_003])
def test_round_trip_odd_sizes(n):
    mask = np.random.default_rng(n).random(n) < 0.3
    blob = encode_mask(mask, LAYOUT)
    assert len(blob) == HEADER_BYTES + packed_length(n)
    np.testing.assert_array_equal(unpack_mask(decode_mask(blob, n, LAYOUT), n), mask)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_round_trip_property(bits):
    mask = np.array(bits)
    np.testing.assert_array_equal(unpack_mask(decode_mask(encode_mask(mask, LAYOUT), mask.size, LAYOUT), mask.size), mask)


def _blob(n=37):
    return encode_mask(np.random.default_rng(0).random(n) < 0.5, LAYOUT)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:10], "truncated"),
    (lambda b: b"XXXX" + b[4:], "not a PRISM mask"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "unknown mask format version 9"),
    (lambda b: b[:-1], "payload is 4 bytes, expected 5"),
    (lambda b: b + b"\x00", "payload is 6 bytes, expected 5"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 0x01]), "checksum mismatch"),
])
def test_malformed_is_rejected(mutate, message):
    with pytest.raises(MaskFormatError, match=message):
        decode_mask(mutate(_blob()), 37, LAYOUT)


def test_wrong_count_and_layout():
    with pytest.raises(MaskFormatError, match="mask has 37 weights, the model has 38"):
        decode_mask(_blob(), 38, LAYOUT)
    with pytest.raises(MaskFormatError, match="does not match the model's"):
        decode_mask(_blob(), 37, b"\x00" * 8)


def test_nonzero_padding_bits_are_rejected():
    # 37 bits -> 5 bytes with 3 spare bits; set one and fix the checksum so only padding is wrong.
    payload = bytearray(np.packbits(np.zeros(37, bool), bitorder="little").tobytes())
    payload[-1] |= 0x80
    header = struct.pack("<4sB3sQ8sI", b"PRSM", 1, bytes(3), 37, LAYOUT, zlib.crc32(bytes(payload)))
    with pytest.raises(MaskFormatError, match="padding bits"):
        decode_mask(header + bytes(payload), 37, LAYOUT)


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
