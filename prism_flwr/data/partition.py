"""Split a dataset's sample indices among clients, in numpy alone.

The iid, shards and dirichlet splits give exactly the indices of flwr-datasets' IidPartitioner
(after HF datasets' ``shuffle(seed)``), ShardPartitioner and DirichletPartitioner, with the same
seed: the same generator calls in the same order (tests/test_partition_reference.py compares them over
many cases). A node therefore partitions without flwr-datasets, datasets, pandas or pyarrow.
"""

from __future__ import annotations

import warnings

import numpy as np

PARTITIONINGS = ("iid", "shards", "dirichlet", "attribute")
# flwr's default floor on a Dirichlet partition's size, kept whenever a draw can meet it.
DIRICHLET_MIN_PARTITION_SIZE = 10
# flwr's DirichletPartitioner redraws 10 times after a draw that misses the floor, then raises.
DIRICHLET_REDRAWS = 10


def _blocks(n: int, num_partitions: int) -> list[slice]:
    """HF datasets' ``shard(num_partitions, i, contiguous=True)``: the first n % k blocks one longer."""
    div, mod = divmod(n, num_partitions)
    starts = [div * i + min(i, mod) for i in range(num_partitions + 1)]
    return [slice(starts[i], starts[i + 1]) for i in range(num_partitions)]


def _iid(idx: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """``idx`` shuffled by ``default_rng(seed).permutation`` (HF ``shuffle(seed)``), cut into blocks."""
    shuffled = idx[np.random.default_rng(seed).permutation(len(idx))]
    return [np.sort(shuffled[block]).astype(np.int64) for block in _blocks(len(idx), num_partitions)]


def _shards(labels: np.ndarray, num_partitions: int, per_partition: int, seed: int) -> list[np.ndarray]:
    """ShardPartitioner: a stable sort by label (Arrow's sort_indices), shards of
    int(n / (k * per_partition)) rows, a seeded permutation of the shards dealt out in order."""
    n, used = len(labels), num_partitions * per_partition
    order = np.argsort(labels, kind="stable")
    size = int(n / used)
    shard_ids = np.random.default_rng(seed).permutation(n // size)[:used]
    return [
        np.sort(np.concatenate([order[s * size : min((s + 1) * size, n)] for s in mine])).astype(np.int64)
        for mine in shard_ids.reshape(num_partitions, per_partition)
    ]


def _dirichlet_draw(labels: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """One draw: for each class present (ascending), proportions ~ Dirichlet(alpha) cut its indices."""
    parts: list[list[np.ndarray]] = [[] for _ in alpha]
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        cuts = (np.cumsum(rng.dirichlet(alpha)) * len(members)).astype(int)[:-1]
        for part, piece in zip(parts, np.split(members, cuts)):
            part.append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> list[np.ndarray]:
    """flwr's DirichletPartitioner, asking for its default floor of 10 samples per partition first.

    flwr redraws at most 10 times when a partition comes out smaller, then raises. At tiny alpha
    (the paper's 0.005) a draw gives nearly every class to a single partition, so with about as
    many partitions as classes some get nothing in almost every draw. We then take the first draw
    as it is (min_partition_size=0: a fresh generator) and warn with the partition sizes: empty
    partitions are what Dirichlet label skew means at that alpha. (The paper's own code instead
    stops giving a class to clients that already hold N/K samples: about one class per client.)
    """
    concentration = np.full(num_partitions, float(alpha))
    rng = np.random.default_rng(seed)
    for _ in range(1 + DIRICHLET_REDRAWS):
        parts = _dirichlet_draw(labels, concentration, rng)
        if min(len(p) for p in parts) >= DIRICHLET_MIN_PARTITION_SIZE:
            return parts
    parts = _dirichlet_draw(labels, concentration, np.random.default_rng(seed))
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
    return _shards(labels, num_partitions, shards_per_partition, seed)


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
