"""Studies that write results/: ``python -m experiments.NAME`` from the repository root."""

from prism_flwr import threads as _threads  # noqa: F401  (OpenMP's wait policy, before torch loads)
