"""Downlink: the 8-bit score grid (exact, idempotent, unbiased rounding) and its wire format."""

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_flwr.federated.broadcast import DOWNLINKS, DownlinkRefused, NodeCopies, digest, receive
from prism_flwr.federated.downlink import (
    GRID,
    HEADER_BYTES,
    LEVELS,
    SCORE_CLIP,
    STEP,
    DownlinkFormatError,
    codes_fingerprint,
    dequantise,
    is_on_grid,
    pack_delta,
    pack_scores,
    pack_update,
    quantise,
    snap_to_grid,
    unpack_scores,
)

GRID8, DELTA_DOWNLINK = DOWNLINKS["grid8"], DOWNLINKS["delta"]


def test_grid_is_uniform_in_score_space_over_the_clipped_range():
    assert GRID.dtype == np.float32 and GRID.size == LEVELS == 256
    assert GRID[0] == -SCORE_CLIP and GRID[-1] == pytest.approx(SCORE_CLIP, abs=1e-6)
    np.testing.assert_allclose(np.diff(GRID.astype(np.float64)), STEP, rtol=1e-5)


@pytest.mark.parametrize("rng", [None, np.random.default_rng(0)])
def test_every_level_is_a_fixed_point(rng):
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quantise(dequantise(codes), rng), codes)
    assert is_on_grid(GRID)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=200), st.integers(0, 2**31))
def test_snap_is_idempotent_and_close(values, seed):
    s = np.array(values, np.float32)
    once = snap_to_grid(s, np.random.default_rng(seed))
    np.testing.assert_array_equal(snap_to_grid(once, np.random.default_rng(seed + 1)), once)
    np.testing.assert_array_equal(snap_to_grid(once), once)
    inside = np.clip(s, -SCORE_CLIP, SCORE_CLIP)
    assert np.all(np.abs(snap_to_grid(s) - inside) <= STEP / 2 + 1e-6)  # nearest: half a step
    assert np.all(np.abs(once - inside) <= STEP + 1e-6)  # stochastic: one step


def test_stochastic_rounding_is_unbiased():
    """A MADA step of a tenth of a grid step survives on average (nearest rounding would drop it)."""
    s = np.full(200_000, GRID[100] + np.float32(0.1 * STEP), np.float32)
    assert np.all(snap_to_grid(s) == GRID[100])
    mean = snap_to_grid(s, np.random.default_rng(1)).astype(np.float64).mean()
    assert mean == pytest.approx(float(s[0]), abs=0.01 * STEP)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="finite"):
        quantise(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="flat"):
        quantise(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        dequantise(np.zeros(3, np.int64))


@pytest.mark.parametrize("method", ["raw", "coded", "auto"])
@pytest.mark.parametrize("n", [1, 9, 5000])
def test_pack_round_trip(method, n):
    codes = quantise(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 2)
    blob = pack_scores(codes, method)
    np.testing.assert_array_equal(unpack_scores(blob, n), codes)
    if method == "raw":
        assert len(blob) == HEADER_BYTES + n


def test_auto_codes_peaked_scores_below_8_bits():
    """Scores concentrated on few levels (late rounds) cost their histogram's entropy."""
    rng = np.random.default_rng(0)
    codes = quantise(
        np.concatenate([rng.normal(-4.4, 0.1, 50_000), rng.normal(4.4, 0.1, 50_000)]).astype(np.float32)
    )
    blob = pack_scores(codes)
    p = np.bincount(codes, minlength=256) / codes.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert 8 * len(blob) / codes.size < 8 * (entropy + 0.01) + 8 * (1024 + HEADER_BYTES) / codes.size
    assert 8 * len(blob) / codes.size < 5
    uniform = quantise(rng.uniform(-6, 6, 5000).astype(np.float32))
    assert len(pack_scores(uniform)) == HEADER_BYTES + 5000  # nothing to gain: raw


def _refit(blob: bytes, payload: bytes) -> bytes:
    head = blob[: HEADER_BYTES - 4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:5], "truncated"),
        (lambda b: b"XXXX" + b[4:], "not PRISM downlink"),
        (lambda b: b[:4] + bytes([3]) + b[5:], "unknown downlink version 3"),
        (lambda b: b[:-1], "payload is 99 bytes"),
        (lambda b: b[:5] + bytes([1]) + b[6:], "checksum mismatch"),
        (lambda b: b[:5] + bytes([5]) + b[6:], "unknown downlink method 5"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 4]), "checksum mismatch"),
    ],
)
def test_malformed_downlink_is_refused(mutate, message):
    blob = pack_scores(np.arange(100, dtype=np.uint8), "raw")
    with pytest.raises(DownlinkFormatError, match=message):
        unpack_scores(mutate(blob), 100)


def test_wrong_count_and_hostile_coded_payloads():
    codes = quantise(np.random.default_rng(0).normal(0, 0.5, 3000).astype(np.float32))
    blob = pack_scores(codes, "coded")
    with pytest.raises(DownlinkFormatError, match="3000 scores, the model has 3001"):
        unpack_scores(blob, 3001)
    payload = blob[HEADER_BYTES:]
    hist = np.frombuffer(payload[:1024], "<u4").copy()
    hist[0] += 1
    with pytest.raises(DownlinkFormatError, match="histogram counts 3001"):
        unpack_scores(_refit(blob, hist.tobytes() + payload[1024:]), 3000)
    with pytest.raises(DownlinkFormatError, match="trailing data"):
        unpack_scores(_refit(blob, payload[:1024] + b"\x01\x00\x00\x00" + payload[1024:]), 3000)
    with pytest.raises(DownlinkFormatError, match="payload is"):
        unpack_scores(_refit(blob, payload + bytes(3000)), 3000)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400).filter(lambda b: len(b) % 4 == 0))
def test_arbitrary_coded_words_decode_or_are_refused(words):
    codes = quantise(np.random.default_rng(0).normal(0, 0.5, 300).astype(np.float32))
    blob = pack_scores(codes, "coded")
    try:
        out = unpack_scores(_refit(blob, blob[HEADER_BYTES : HEADER_BYTES + 1024] + words), 300)
    except DownlinkFormatError:
        return
    assert out.dtype == np.uint8 and out.size == 300


def _rounds(n=20_000, seed=0, clients=4, lam=0.25):
    """Two consecutive global states of a MADA round: ``lam logit(theta_agg) + (1 - lam) s``,
    theta_agg the smoothed mean of ``clients`` masks drawn near the old theta."""
    rng = np.random.default_rng(seed)
    old = snap_to_grid(rng.normal(0, 2, n).astype(np.float32))
    theta = np.clip(1 / (1 + np.exp(-old.astype(np.float64))) + rng.normal(0, 0.1, n), 0.001, 0.999)
    counts = sum((rng.random(n) < theta).astype(int) for _ in range(clients))
    agg = np.log(0.01 + 0.98 * counts / clients) - np.log(0.99 - 0.98 * counts / clients)
    new = snap_to_grid((lam * agg + (1 - lam) * old).astype(np.float32), np.random.default_rng(seed + 1))
    return quantise(old), quantise(new)


def test_delta_rebuilds_the_new_state_exactly_and_is_smaller():
    old, new = _rounds()
    blob = pack_delta(new, old)
    np.testing.assert_array_equal(unpack_scores(blob, old.size, base=old), new)
    full = pack_scores(new)
    change = np.bincount((new - old).astype(np.uint8), minlength=256) / new.size
    h_change = -(change[change > 0] * np.log2(change[change > 0])).sum()
    assert 8 * len(full) / new.size > 7 and h_change > 5  # neither the state nor the change is cheap
    assert 8 * len(blob) / new.size < 0.7 * h_change  # the change given the old score is
    assert pack_update(new, old) == blob and pack_update(new, None) == full
    wrapped = np.array([0, 255, 7], np.uint8)  # changes across the ends wrap mod 256, still exact
    np.testing.assert_array_equal(
        unpack_scores(pack_delta(wrapped[::-1].copy(), wrapped), 3, base=wrapped), wrapped[::-1]
    )


def test_delta_on_the_wrong_base_is_refused():
    old, new = _rounds()
    blob = pack_delta(new, old)
    with pytest.raises(DownlinkFormatError, match="holds no previous scores"):
        unpack_scores(blob, old.size)
    stale = old.copy()
    stale[0] ^= 1
    with pytest.raises(
        DownlinkFormatError, match=f"based on scores {codes_fingerprint(old):08x}.*needs the full state"
    ):
        unpack_scores(blob, old.size, base=stale)


def test_delta_that_does_not_rebuild_the_target_is_refused():
    old, new = _rounds(n=500)
    blob = pack_delta(new, old)
    payload = bytearray(blob[HEADER_BYTES:])
    payload[4] ^= 1  # the target checksum
    with pytest.raises(DownlinkFormatError, match="does not rebuild"):
        unpack_scores(_refit(blob, bytes(payload)), 500, base=old)


def test_coded_downlink_bytes_are_pinned():
    codes = quantise(np.linspace(-5, 5, 10_007).astype(np.float32))
    blob = pack_scores(codes, "coded")
    assert (len(blob), zlib.crc32(blob)) == (10_724, 0x45DE9999)


def test_delta_histograms_must_fit_the_base():
    old, new = _rounds(n=3000)
    blob = pack_delta(new, old)
    payload = bytearray(blob[HEADER_BYTES:])
    bits = payload[8]
    assert bits in (0, 2, 4, 6, 8)
    payload[8] = 3
    with pytest.raises(DownlinkFormatError, match="unknown context count"):
        unpack_scores(_refit(blob, bytes(payload)), 3000, base=old)
    payload[8] = bits
    (nnz,) = struct.unpack_from("<H", payload, 9)
    first_count = 9 + 2 + nnz
    payload[first_count] ^= 1  # the first context's first count: no longer sums to its size
    with pytest.raises(DownlinkFormatError, match="histogram 0 does not fit the base"):
        unpack_scores(_refit(blob, bytes(payload)), 3000, base=old)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400).filter(lambda b: len(b) % 4 == 0))
def test_arbitrary_delta_words_decode_or_are_refused(words):
    old, new = _rounds(n=300)
    blob = pack_delta(new, old)
    payload = blob[HEADER_BYTES:]
    tables_end = 9  # base, target, context bits, then each context's sparse histogram
    for _ in range(1 << payload[8]):
        tables_end += 2 + 5 * struct.unpack_from("<H", payload, tables_end)[0]
    assert (len(payload) - tables_end) % 4 == 0
    try:
        out = unpack_scores(_refit(blob, payload[:tables_end] + words), 300, base=old)
    except DownlinkFormatError:
        return
    assert out.dtype == np.uint8 and out.size == 300


# ---------------------------------------------------------------- the broadcast (broadcast.py)
def _states(n=5_000):
    old, new = _rounds(n=n)
    return dequantise(old), dequantise(new)


def test_delta_downlink_rebuilds_the_full_state_bit_for_bit():
    old, new = _states()
    wire = DELTA_DOWNLINK.encode(new, old)
    assert DELTA_DOWNLINK.is_delta(wire) and wire.nbytes < GRID8.encode(new).nbytes
    got = receive(DELTA_DOWNLINK, wire, new.size, {"digest": digest(new), "base": digest(old)}, held=old)
    full = GRID8.decode(GRID8.encode(new), new.size)
    assert got.dtype == np.float32 and got.tobytes() == full.tobytes() == new.tobytes()
    # a node with no copy gets (and decodes) the full state, whatever it held
    fresh = DELTA_DOWNLINK.encode(new, None)
    assert not DELTA_DOWNLINK.is_delta(fresh)
    for held in (None, old[::-1].copy()):
        got = receive(DELTA_DOWNLINK, fresh, new.size, {"digest": digest(new), "base": ""}, held=held)
        assert got.tobytes() == new.tobytes()


def test_delta_downlink_refuses_a_wrong_base_forged_digest_or_forged_delta():
    old, new = _states()
    wire = DELTA_DOWNLINK.encode(new, old)
    info = {"digest": digest(new), "base": digest(old)}
    other = old.copy()
    other[0] = GRID[(int(quantise(other[:1])[0]) + 1) % LEVELS]
    for held in (None, other):  # missed a round, or holds another global: needs the full state
        with pytest.raises(DownlinkRefused, match="needs the full state"):
            receive(DELTA_DOWNLINK, wire, new.size, info, held=held)
    with pytest.raises(DownlinkRefused, match="not the one sent"):  # the message names another global
        receive(DELTA_DOWNLINK, wire, new.size, {**info, "digest": digest(other)}, held=old)
    # the record names the base the node holds, the delta was built on another
    with pytest.raises(DownlinkRefused, match="based on"):
        receive(DELTA_DOWNLINK, DELTA_DOWNLINK.encode(new, other), new.size, info, held=old)
    forged = wire.copy()
    forged[-1] ^= 0x40
    with pytest.raises(DownlinkRefused, match="does not decode"):
        receive(DELTA_DOWNLINK, forged, new.size, info, held=old)
    for bad_info in (None, {"digest": digest(new)}, {"digest": 7, "base": ""}):
        with pytest.raises(DownlinkRefused, match="lacks"):
            receive(DELTA_DOWNLINK, wire, new.size, bad_info, held=old)


def test_node_copies_vouch_only_for_confirmed_recent_states():
    old, new = _states(n=300)
    copies = NodeCopies(keep=2)
    assert copies.base_for(1) == ("", None)  # a fresh node
    name = copies.sending(1, old)
    assert copies.sent_to(1) == name and copies.base_for(1) == ("", None)  # sent, not yet confirmed
    copies.holds(1, name)
    got_name, got = copies.base_for(1)
    assert got_name == name and got.tobytes() == old.tobytes()
    copies.sending(2, new)
    copies.sending(2, np.zeros_like(new))  # a third distinct state: the oldest is no base any more
    assert copies.base_for(1) == ("", None)
    copies.holds(2, copies.sent_to(2))
    copies.forget(2)
    assert copies.base_for(2) == ("", None)
