"""Split a dataset's sample indices among clients, with flwr-datasets' partitioners.

The partitioners run on a small in-memory ``datasets.Dataset`` holding only the labels and the
sample indices ("idx"): no images. Partitioners may reorder that table (ShardPartitioner sorts it
by label, the IID split shuffles it), so a partition is read back through its "idx" column.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

# flwr-datasets (with datasets, pandas, seaborn) takes ~3 s to import; only a client that
# partitions needs it, not the ServerApp that imports this module through task.py.
if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

PARTITIONINGS = ("iid", "shards", "dirichlet", "attribute")
# flwr's default floor on a Dirichlet partition's size, kept whenever a draw can meet it.
DIRICHLET_MIN_PARTITION_SIZE = 10


def _table(**columns: np.ndarray) -> datasets.Dataset:
    # Arrow format: flwr reads the label column with np.array(dataset["label"]); datasets 4 returns a
    # lazy Column there that numpy converts element by element (0.5 s for 60k), pyarrow at once.
    import datasets

    return datasets.Dataset.from_dict(columns).with_format("arrow")


def _run(partitioner: Partitioner, table: datasets.Dataset, num_partitions: int) -> list[np.ndarray]:
    partitioner.dataset = table
    parts = (partitioner.load_partition(i)["idx"].to_numpy() for i in range(num_partitions))
    return [np.sort(part).astype(np.int64) for part in parts]


def _iid(idx: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    # IidPartitioner cuts contiguous blocks and leaves shuffling to the caller (FederatedDataset
    # shuffles by default), so the seed enters through the shuffle.
    from flwr_datasets.partitioner import IidPartitioner

    table = _table(idx=idx).shuffle(seed=seed)
    return _run(IidPartitioner(num_partitions), table, num_partitions)


def _dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> list[np.ndarray]:
    """flwr's DirichletPartitioner, asking for its default floor of 10 samples per partition first.

    flwr redraws at most 10 times when a partition comes out smaller, then raises. At tiny alpha
    (the paper's 0.005) a draw gives nearly every class to a single partition, so with about as
    many partitions as classes some get nothing in almost every draw. We then take the first draw
    as it is (min_partition_size=0) and warn with the partition sizes: empty partitions are what
    Dirichlet label skew means at that alpha. (The paper's own code instead stops giving a class
    to clients that already hold N/K samples, which yields about one class per client.)
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    table = _table(label=labels, idx=np.arange(len(labels)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # flwr warns at each redraw; we warn once below
            partitioner = DirichletPartitioner(
                num_partitions, "label", alpha, min_partition_size=DIRICHLET_MIN_PARTITION_SIZE, seed=seed
            )
            return _run(partitioner, table, num_partitions)
    except ValueError as err:
        if "attempts" not in str(err):
            raise
    parts = _run(
        DirichletPartitioner(num_partitions, "label", alpha, min_partition_size=0, seed=seed),
        table,
        num_partitions,
    )
    warnings.warn(
        f"Dirichlet(alpha={alpha}): no draw gave all {num_partitions} partitions "
        f">= {DIRICHLET_MIN_PARTITION_SIZE} samples; using one without that floor, "
        f"partition sizes {[len(p) for p in parts]}",
        UserWarning,
        stacklevel=3,
    )
    return parts


def _attribute(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """First half of the partitions: label 1 only (CelebA: male); second half: label 0; IID within."""
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise ValueError(
            f"partitioning 'attribute' needs binary 0/1 labels (CelebA's Male attribute), "
            f"got label values {sorted(values)[:10]}"
        )
    if num_partitions % 2:
        raise ValueError(
            f"partitioning 'attribute' needs an even number of partitions (half get label 1, "
            f"half label 0), got {num_partitions}"
        )
    half = num_partitions // 2
    parts = []
    for value in (1, 0):
        group = np.flatnonzero(labels == value)
        if len(group) < half:
            raise ValueError(
                f"partitioning 'attribute': {len(group)} samples with label {value}, "
                f"fewer than the {half} partitions that should share them"
            )
        parts += _iid(group, half, seed)
    return parts


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    method: str,
    seed: int,
    alpha: float = 0.1,
    shards_per_partition: int = 4,
) -> list[np.ndarray]:
    """Indices of every partition's samples: sorted int64 arrays, disjoint, deterministic from seed.

    - "iid": a seeded shuffle cut into equal blocks; covers all samples.
    - "shards": sorted by label, cut into num_partitions * shards_per_partition equal shards,
      shards_per_partition random ones per partition (paper: 4). The last
      len(labels) % (num_partitions * shards_per_partition) label-sorted samples are left out.
    - "dirichlet": per class, proportions ~ Dirichlet(alpha) over partitions; covers all samples;
      partitions may be empty at tiny alpha (see ``_dirichlet``).
    - "attribute": binary labels; label 1 split IID over the first half of the partitions,
      label 0 over the second half (the paper's CelebA male/female split).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if method not in PARTITIONINGS:
        raise ValueError(f"unknown partitioning {method!r}; choose one of {', '.join(PARTITIONINGS)}")
    if not 1 <= num_partitions <= len(labels):
        raise ValueError(
            f"num_partitions must be between 1 and the number of samples ({len(labels)}), "
            f"got {num_partitions}"
        )
    if method == "iid":
        return _iid(np.arange(len(labels)), num_partitions, seed)
    if method == "attribute":
        return _attribute(labels, num_partitions, seed)
    if method == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        return _dirichlet(labels, num_partitions, alpha, seed)
    if not 1 <= shards_per_partition <= len(labels) // num_partitions:
        raise ValueError(
            f"shards_per_partition must be between 1 and len(labels) // num_partitions "
            f"({len(labels) // num_partitions}), got {shards_per_partition}"
        )
    from flwr_datasets.partitioner import ShardPartitioner

    partitioner = ShardPartitioner(
        num_partitions, "label", num_shards_per_partition=shards_per_partition, seed=seed
    )
    return _run(partitioner, _table(label=labels, idx=np.arange(len(labels))), num_partitions)


def label_histogram(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """How many of the samples at ``indices`` carry each label 0 .. num_classes - 1."""
    counts = np.bincount(np.asarray(labels)[np.asarray(indices, dtype=np.int64)], minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"labels go up to {len(counts) - 1}, beyond num_classes={num_classes}")
    return counts.tolist()


def label_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance of each partition's label distribution from that of all labels.

    0 when every partition has the global label proportions; approaches 1 when each holds one rare
    class. Empty partitions have no label distribution and are left out of the mean.
    """
    labels = np.asarray(labels)
    overall = np.asarray(label_histogram(labels, np.arange(len(labels)), num_classes)) / len(labels)
    distances = [
        0.5 * np.abs(hist / hist.sum() - overall).sum()
        for hist in (np.asarray(label_histogram(labels, part, num_classes)) for part in parts)
        if hist.sum() > 0
    ]
    if not distances:
        raise ValueError("label_skew needs at least one non-empty partition")
    return float(np.mean(distances))
