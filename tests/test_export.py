"""The sparse model file: exact round trip, size, and one clear error for every malformed file."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_flwr.federated.export import (
    ModelFileError,
    dense_float32_bytes,
    expected_weight_count,
    load_sparse_model,
    save_sparse_model,
)
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import get_scores, masked_layers, num_masked, set_mask_mode


def test_round_trip_rebuilds_the_masked_network(tmp_path):
    spec = GeneratorSpec(ngf=8, nc=3, seed=11)
    n = num_masked(ResnetGenerator(spec))
    mask = np.random.default_rng(0).random(n) < 0.3
    size = save_sparse_model(tmp_path / "m.prism", spec, mask, {"dataset": "cifar10"})
    model, header = load_sparse_model(tmp_path / "m.prism")
    assert header["dataset"] == "cifar10" and header["generator"] == spec.to_dict()
    assert torch.equal(get_scores(model) > 0, torch.from_numpy(mask))
    # The forward pass is the frozen network times exactly that mask, in any mask mode.
    reference = ResnetGenerator(spec)
    flat = torch.from_numpy(mask)
    offset = 0
    for got, ref in zip(masked_layers(model), masked_layers(reference)):
        k = ref.weight.numel()
        torch.testing.assert_close(
            got.masked_weight(), ref.weight * flat[offset : offset + k].view_as(ref.weight).float()
        )
        offset += k
    set_mask_mode(model, "sample")
    assert model(torch.randn(4, 128)).shape == (4, 3, 32, 32)
    assert size < dense_float32_bytes(spec) / 30  # 1 bit vs 32 bits per weight, plus a small header


@pytest.mark.parametrize(
    "spec", [GeneratorSpec(ngf=64), GeneratorSpec(ngf=4, nz=7, nc=3), GeneratorSpec(ngf=16)]
)
def test_weight_count_is_known_before_building(spec):
    assert expected_weight_count(spec) == num_masked(ResnetGenerator(spec))


SPEC = GeneratorSpec(ngf=2, nz=8, seed=3)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.prism"
    save_sparse_model(path, SPEC, np.ones(expected_weight_count(SPEC), bool), {"mask": "sample"})
    return path.read_bytes()


def _with_header(good: bytes, header, hlen=None, mask=None) -> bytes:
    """A file whose checksum is VALID: only the schema and the sizes can refuse it."""
    old = struct.unpack_from("<I", good, 12)[0]
    head = json.dumps(header).encode() if isinstance(header, dict) else header
    wire = good[16 + old : -4] if mask is None else mask
    body = good[:12] + struct.pack("<I", len(head) if hlen is None else hlen) + head + wire
    return body + struct.pack("<I", zlib.crc32(body))


GEN = {"nz": 8, "ngf": 2, "nc": 1, "seed": 3}
CRAFTED = [
    ({"format": 2, "generator": {**GEN, "ngf": 0}}, "ngf = 0"),
    ({"format": 2, "generator": {**GEN, "ngf": 10**9}}, "ngf = 1000000000"),
    ({"format": 2, "generator": {**GEN, "nz": 2**40}}, "nz"),
    ({"format": 2, "generator": {**GEN, "nc": 2}}, "nc"),
    ({"format": 2, "generator": {**GEN, "seed": -1}}, "seed"),
    ({"format": 2, "generator": {**GEN, "ngf": True}}, "ngf = True"),
    ({"format": 2, "generator": {**GEN, "ngf": 2.0}}, "ngf"),
    ({"format": 2, "generator": {**GEN, "x": 1}}, "exactly"),
    ({"format": 2, "generator": GEN, "evil": 1}, "unknown header keys"),
    ({"format": 2, "generator": GEN, "dataset": "../../x"}, "dataset"),
    ({"format": 3, "generator": GEN}, "format 3"),
    (
        {"format": 2, "generator": {**GEN, "ngf": 512}},
        "mask section",
    ),  # huge network, refused before allocation
    ({"format": 2, "generator": [8, 2, 1, 3]}, "exactly"),
    (b'{"format": 2, "format": 2, "generator": {}}', "duplicate key"),
    (b"\xff\xfe not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
]


@pytest.mark.parametrize("header, why", CRAFTED)
def test_crafted_header_with_valid_checksum_is_refused(tmp_path, good, header, why):
    (tmp_path / "bad.prism").write_bytes(_with_header(good, header))
    with pytest.raises(ModelFileError, match=why):
        load_sparse_model(tmp_path / "bad.prism")


def test_header_length_mask_and_count_bounds(tmp_path, good):
    path = tmp_path / "bad.prism"
    for blob, why in [
        (_with_header(good, {"format": 2, "generator": GEN}, hlen=2**32 - 1), "header length"),
        (_with_header(good, {"format": 2, "generator": GEN}, mask=b"x" * 40), "mask section"),
        (struct.pack("<I", 2) + b"{}" + b"\0" * 40, "older version"),
        (b"", "truncated"),
        (b"PRISMMDL", "truncated"),
        (b"\0" * 64, "not a PRISM model"),
    ]:
        path.write_bytes(blob)
        with pytest.raises(ModelFileError, match=why):
            load_sparse_model(path)
    path.write_bytes(good)
    with pytest.raises(ModelFileError, match="allowed"):
        load_sparse_model(path, max_weights=100)
    with pytest.raises(ValueError, match="unknown header keys"):  # never written in the first place
        save_sparse_model(path, SPEC, np.ones(expected_weight_count(SPEC), bool), {"evil": 1})


def test_checksum_covers_the_header(tmp_path, good):
    blob = bytearray(good)
    blob[16 + good[16:].index(b'"ngf": 2') + 7] = ord("3")  # ngf 2 -> 3 in the JSON, same length
    (tmp_path / "bad.prism").write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="checksum"):
        load_sparse_model(tmp_path / "bad.prism")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**9), st.sampled_from(["flip", "cut", "append"]))
def test_any_damage_gives_one_clear_error(tmp_path_factory, good, pos, how):
    blob = bytearray(good)
    if how == "flip":
        blob[pos % len(blob)] ^= 1 << (pos % 8)
    elif how == "cut":
        blob = blob[: pos % len(blob)]
    else:
        blob += bytes([pos % 256]) * (1 + pos % 7)
    path = tmp_path_factory.mktemp("fuzz") / "m.prism"
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError):
        load_sparse_model(path)


def test_cli_names_a_malformed_model_file_without_a_traceback(tmp_path, capsys):
    from prism_flwr.cli import main

    bad = tmp_path / "bad.prism"
    bad.write_bytes(b"garbage")
    assert main(["sample", str(bad), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err and not (tmp_path / "g.png").exists()
