"""Studies that write results/: ``python -m experiments.NAME`` from the repository root."""
