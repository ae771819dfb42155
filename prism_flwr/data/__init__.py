"""Datasets: loading and preprocessing, partitioning among clients, and the per-node client cache."""
