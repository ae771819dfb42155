"""The sparse model file: exact round trip, size, and rejection of a damaged file."""

import numpy as np
import pytest
import torch

from prism_flwr.codec import MaskFormatError
from prism_flwr.export import dense_float32_bytes, load_sparse_model, save_sparse_model
from prism_flwr.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.masked import get_scores, masked_layers, num_masked, set_mask_mode


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
        torch.testing.assert_close(got.masked_weight(), ref.weight * flat[offset:offset + k].view_as(ref.weight).float())
        offset += k
    set_mask_mode(model, "sample")
    assert model(torch.randn(4, 128)).shape == (4, 3, 32, 32)
    assert size < dense_float32_bytes(spec) / 30  # 1 bit vs 32 bits per weight, plus a small header


def test_damaged_file_is_rejected(tmp_path):
    spec = GeneratorSpec(ngf=4)
    mask = np.ones(num_masked(ResnetGenerator(spec)), bool)
    save_sparse_model(tmp_path / "m.prism", spec, mask)
    blob = bytearray((tmp_path / "m.prism").read_bytes())
    blob[-1] ^= 0x10
    (tmp_path / "bad.prism").write_bytes(bytes(blob))
    with pytest.raises(MaskFormatError, match="checksum"):
        load_sparse_model(tmp_path / "bad.prism")
