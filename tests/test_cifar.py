"""CIFAR-10's batches read without torchvision: the pixels and labels torchvision's CIFAR10 gives,
whole or only some rows, and a batch pickle that asks for more than numpy arrays is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from prism_flwr.data.cifar import cifar_images, cifar_labels
from prism_flwr.data.datasets import load_labels, load_rows
from tests.support.fixtures_data import _py2_pickle, write_cifar10


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_cifar10(tmp_path, per_batch=7, n_test=5)
    rng = np.random.default_rng(4)
    folder = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]:  # random pixels, not constant
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        entry["data"] = rng.integers(0, 256, entry["data"].shape, dtype=np.uint8)
        _py2_pickle(folder / name, entry)
    return tmp_path


@pytest.mark.parametrize("train", [True, False])
def test_same_as_torchvision(cifar_root: Path, train: bool) -> None:
    from prism_flwr.data.datasets import _cifar10_class

    tv = _cifar10_class()(cifar_root, train=train)
    folder = cifar_root / "cifar-10-batches-py"
    np.testing.assert_array_equal(cifar_images(folder, train).numpy(), tv.data.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(cifar_labels(folder, train), np.asarray(tv.targets))


def test_rows_in_the_order_asked(cifar_root: Path) -> None:
    folder = cifar_root / "cifar-10-batches-py"
    whole = cifar_images(folder, True).numpy()
    rows = np.array([34, 0, 8, 8, 20, 6, 7])  # across batches, unsorted, one twice
    np.testing.assert_array_equal(cifar_images(folder, True, rows).numpy(), whole[rows])
    np.testing.assert_array_equal(load_rows("cifar10", cifar_root, rows).numpy(), whole[rows])
    assert load_labels("cifar10", cifar_root).tolist() == cifar_labels(folder, True).tolist()
    assert cifar_images(folder, True, np.array([], dtype=np.int64)).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="rows outside the split's 35 images"):
        cifar_images(folder, True, np.array([3, 35]))


class _Payload:
    def __reduce__(self):
        return (print, ("not data",))


def test_a_batch_that_asks_for_more_than_arrays_is_refused(cifar_root: Path) -> None:
    folder = cifar_root / "cifar-10-batches-py"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Payload()}, f)
    with pytest.raises(
        ValueError, match=r"data_batch_2: not a CIFAR-10 batch \(UnpicklingError: .*builtins.print"
    ):
        cifar_labels(folder, True)
    (folder / "data_batch_2").write_bytes(
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
    )
    assert len(cifar_labels(folder, True)) == 7 * 4 + 2  # a plain numpy pickle is read
    (folder / "data_batch_3").write_bytes(
        pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]})
    )
    with pytest.raises(ValueError, match=r"data_batch_3: data uint8 \(2, 10\)"):
        cifar_images(folder, True, np.array([0]))
