"""Speed benchmarks: each prints a table and one JSON line. Run from the repository root: ``python -m benchmarks.NAME``."""
