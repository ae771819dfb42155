"""The numpy partitioners give exactly flwr-datasets' partitions (iid after HF datasets' seeded
shuffle, shards, dirichlet with its redraws and our floor-free fallback), over many cases.

flwr-datasets is a test dependency only: a node partitions in numpy. Skipped where it is absent.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from prism_flwr.data.partition import DIRICHLET_MIN_PARTITION_SIZE, partition_indices

pytest.importorskip("flwr_datasets")
datasets = pytest.importorskip("datasets")
from flwr_datasets.partitioner import (  # noqa: E402
    DirichletPartitioner,
    IidPartitioner,
    ShardPartitioner,
)


def _table(**columns: np.ndarray):
    return datasets.Dataset.from_dict(columns).with_format("arrow")


def _run(partitioner, table, num_partitions: int) -> list[np.ndarray]:
    partitioner.dataset = table
    parts = (partitioner.load_partition(i)["idx"].to_numpy() for i in range(num_partitions))
    return [np.sort(part).astype(np.int64) for part in parts]


def reference(labels: np.ndarray, k: int, method: str, seed: int, alpha: float, spp: int):
    """flwr-datasets' route, as prism_flwr partitioned before: (parts, path) where path says which
    Dirichlet branch ran ("first", "redrawn", "fallback"; "" for the others)."""
    idx = np.arange(len(labels))
    if method == "iid":
        return _run(IidPartitioner(k), _table(idx=idx).shuffle(seed=seed), k), ""
    table = _table(label=labels, idx=idx)
    if method == "shards":
        return _run(ShardPartitioner(k, "label", num_shards_per_partition=spp, seed=seed), table, k), ""
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            parts = _run(
                DirichletPartitioner(k, "label", alpha, min_partition_size=DIRICHLET_MIN_PARTITION_SIZE,
                                     seed=seed), table, k)  # fmt: skip
        return parts, "redrawn" if record else "first"
    except ValueError as err:
        assert "attempts" in str(err)
    return _run(
        DirichletPartitioner(k, "label", alpha, min_partition_size=0, seed=seed), table, k
    ), "fallback"


def _cases() -> list[tuple]:
    rng = np.random.default_rng(2026)
    cases = []
    for i in range(120):
        n = int(rng.integers(20, 3000))
        classes = int(rng.integers(1, 12))
        # uneven class sizes, some classes absent; labels in random order
        labels = rng.choice(classes + 2, size=n, p=rng.dirichlet(np.ones(classes + 2))).astype(np.int64)
        k = int(rng.integers(1, min(n, 40) + 1))
        method = ("iid", "shards", "dirichlet")[i % 3]
        alpha = float(rng.choice([0.005, 0.05, 0.3, 1.0, 5.0, 100.0]))
        spp = int(rng.integers(1, min(6, n // k) + 1))
        cases.append((labels, k, method, int(rng.integers(0, 2**31)), alpha, spp))
    return cases


def test_numpy_partitioners_match_flwr_datasets() -> None:
    paths = set()
    for labels, k, method, seed, alpha, spp in _cases():
        want, path = reference(labels, k, method, seed, alpha, spp)
        paths.add(path)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = partition_indices(labels, k, method, seed, alpha=alpha, shards_per_partition=spp)
        case = f"n={len(labels)} k={k} {method} seed={seed} alpha={alpha} shards={spp} ({path})"
        assert len(got) == len(want), case
        for a, b in zip(got, want):
            assert a.dtype == np.int64 and np.array_equal(a, b), case
        assert bool(record) == (path == "fallback"), case
    # every branch of flwr's Dirichlet partitioner was compared
    assert {"", "first", "redrawn", "fallback"} <= paths, paths


@pytest.mark.parametrize("seed", [0, 30, 2**31 - 1])
def test_the_default_run_sizes_match(seed: int) -> None:
    """60,000 Fashion-MNIST-like labels, the paper's settings."""
    labels = np.random.default_rng(seed).permutation(np.arange(60_000) % 10)
    for method, k, alpha in [("iid", 2, 0.1), ("shards", 10, 0.1), ("dirichlet", 10, 0.05),
                             ("dirichlet", 10, 0.005), ("attribute", 4, 0.1)]:  # fmt: skip
        lab = labels % 2 if method == "attribute" else labels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            got = partition_indices(lab, k, method, seed, alpha=alpha)
            if method == "attribute":  # label 1 then label 0, each an IID split of its own
                want = []
                for value in (1, 0):
                    group = np.flatnonzero(lab == value)
                    want += [group[p] for p in reference(lab[group], k // 2, "iid", seed, alpha, 4)[0]]
            else:
                want = reference(lab, k, method, seed, alpha, 4)[0]
        assert all(np.array_equal(a, np.sort(b)) for a, b in zip(got, want)), method


def test_the_last_redraw_is_kept() -> None:
    """A case whose eleventh draw (flwr's tenth redraw, its last) is the first to meet the floor."""
    rng = np.random.default_rng(40)
    n, k, alpha = int(rng.integers(100, 400)), int(rng.integers(5, 12)), float(rng.choice([0.3, 0.5, 1.0]))
    labels = rng.integers(0, 5, size=n)
    want, path = reference(labels, k, "dirichlet", 40, alpha, 4)
    assert (n, k, alpha, path) == (268, 10, 0.3, "redrawn")
    got = partition_indices(labels, k, "dirichlet", 40, alpha=alpha)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
