"""prism_flwr.data.partition: the numpy partitioners over label arrays (tests/test_partition_reference.py
compares them with flwr-datasets)."""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest

from prism_flwr.data.datasets import FMNIST_SYSTEM_DIR
from prism_flwr.data.partition import PARTITIONINGS, label_histogram, label_skew, partition_indices

# 10 balanced classes in random order; 2000 = 10 partitions * 4 shards * 50, so shards cover all.
LABELS = np.random.default_rng(0).permutation(np.arange(2000) % 10)
MALE = (np.random.default_rng(1).random(999) < 0.4).astype(np.int64)
FMNIST_LABELS = FMNIST_SYSTEM_DIR / "train-labels-idx1-ubyte.gz"


def _check_split(parts: list[np.ndarray], num_partitions: int, n: int, cover: bool = True) -> None:
    assert len(parts) == num_partitions
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "partitions overlap"
    assert joined.min() >= 0 and joined.max() < n
    if cover:
        assert len(joined) == n


def _dirichlet_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("Dirichlet(")]


@pytest.mark.parametrize(
    "method, alpha", [("iid", 0.1), ("shards", 0.1), ("dirichlet", 0.5), ("dirichlet", 0.005)]
)
def test_disjoint_cover_and_seeded(method: str, alpha: float) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        parts = partition_indices(LABELS, 10, method, seed=30, alpha=alpha)
        same = partition_indices(LABELS, 10, method, seed=30, alpha=alpha)
        other = partition_indices(LABELS, 10, method, seed=31, alpha=alpha)
    _check_split(parts, 10, len(LABELS))
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    # Only tiny alpha gives up flwr's 10-sample floor, and says so (with the partition sizes).
    announced = _dirichlet_warnings(record)
    assert bool(announced) == (alpha < 0.01)
    if announced:
        assert f"partition sizes {[len(p) for p in parts]}" in announced[0]


def test_iid_is_balanced() -> None:
    parts = partition_indices(LABELS, 8, "iid", seed=3)
    assert [len(p) for p in parts] == [250] * 8
    assert label_skew(LABELS, parts, 10) < 0.1


def test_shards_per_partition_bounds_labels() -> None:
    for spp in (1, 2, 4):
        parts = partition_indices(LABELS, 10, "shards", seed=5, shards_per_partition=spp)
        _check_split(parts, 10, len(LABELS))
        assert all(len(np.unique(LABELS[p])) <= spp for p in parts)
        assert {len(p) for p in parts} == {200}


def test_shards_leave_out_the_remainder() -> None:
    labels = LABELS[:1999]  # 1999 % (10 * 4) = 39 label-sorted samples are not dealt out
    parts = partition_indices(labels, 10, "shards", seed=5)
    _check_split(parts, 10, len(labels), cover=False)
    assert sum(len(p) for p in parts) == 1999 - 39


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skews = [
        label_skew(LABELS, partition_indices(LABELS, 10, "dirichlet", seed=30, alpha=a), 10)
        for a in (100.0, 1.0, 0.05)
    ]
    assert skews[0] < 0.1 < skews[1] < skews[2]


@pytest.mark.skipif(not FMNIST_LABELS.is_file(), reason=f"{FMNIST_LABELS} absent (dataset-fashion-mnist)")
def test_paper_settings_on_real_fmnist_labels() -> None:
    labels = np.frombuffer(gzip.decompress(FMNIST_LABELS.read_bytes()), np.uint8, offset=8).astype(np.int64)
    shards = partition_indices(labels, 10, "shards", seed=30, shards_per_partition=4)
    _check_split(shards, 10, 60_000)
    assert all(len(np.unique(labels[p])) <= 4 for p in shards)
    skews = []
    for alpha in (100.0, 1.0, 0.05):
        parts = partition_indices(labels, 10, "dirichlet", seed=30, alpha=alpha)
        _check_split(parts, 10, 60_000)
        skews.append(label_skew(labels, parts, 10))
    assert skews[0] < skews[1] < skews[2]
    with pytest.warns(UserWarning, match=r"Dirichlet\(alpha=0.005\)"):
        tiny = partition_indices(labels, 10, "dirichlet", seed=30, alpha=0.005)
    _check_split(tiny, 10, 60_000)
    assert label_skew(labels, tiny, 10) > skews[2] - 0.05


def test_attribute_split_male_then_female() -> None:
    parts = partition_indices(MALE, 10, "attribute", seed=30)
    _check_split(parts, 10, len(MALE))
    assert all(set(MALE[p]) == {1} for p in parts[:5])
    assert all(set(MALE[p]) == {0} for p in parts[5:])
    sizes = [len(p) for p in parts]
    assert max(sizes[:5]) - min(sizes[:5]) <= 1 and max(sizes[5:]) - min(sizes[5:]) <= 1
    assert partition_indices(MALE, 10, "attribute", seed=30)[0].tolist() == parts[0].tolist()
    assert partition_indices(MALE, 10, "attribute", seed=31)[0].tolist() != parts[0].tolist()


@pytest.mark.parametrize(
    "labels, num_partitions, match",
    [
        (LABELS, 10, r"needs binary 0/1 labels \(CelebA's Male attribute\), got label values \[0, 1, 2"),
        (MALE, 3, "needs an even number of partitions"),
        (np.ones(50, np.int64), 4, "0 samples with label 0, fewer than the 2 partitions"),
    ],
)
def test_attribute_rejects(labels: np.ndarray, num_partitions: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition_indices(labels, num_partitions, "attribute", seed=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"method": "pathological"},
            "unknown partitioning 'pathological'; choose one of iid, shards, dirichlet, attribute",
        ),
        ({"num_partitions": 0}, "num_partitions must be between 1 and the number of samples"),
        ({"num_partitions": 2001}, "num_partitions must be between 1 and the number of samples"),
        ({"method": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
        ({"shards_per_partition": 0}, "shards_per_partition must be between 1 and"),
        ({"labels": LABELS.reshape(2, -1)}, "labels must be a 1-D integer array"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"labels": LABELS, "num_partitions": 10, "method": "shards", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        partition_indices(**args)


def test_histogram_and_skew_values() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert label_histogram(labels, np.array([0, 2, 3]), 4) == [1, 2, 0, 0]
    assert label_histogram(labels, np.array([], dtype=np.int64), 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="beyond num_classes=2"):
        label_histogram(labels, np.arange(6), 2)
    assert label_skew(labels, [np.array([0, 2, 4]), np.array([1, 3, 5])], 3) == 0.0
    # each partition holds one class of three: TV distance 1 - 1/3; the empty one is left out
    one_class = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([], dtype=np.int64)]
    assert label_skew(labels, one_class, 3) == pytest.approx(2 / 3)
    assert set(PARTITIONINGS) == {"iid", "shards", "dirichlet", "attribute"}
