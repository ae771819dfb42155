"""Speed benchmarks: each prints a table and one JSON line. Run ``python -m benchmarks.NAME``."""

from prism_flwr import threads as _threads  # noqa: F401  (OpenMP's wait policy, before torch loads)
