"""Speed benchmarks: each prints a table and one JSON line. Run ``python -m benchmarks.NAME``."""
