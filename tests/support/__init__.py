"""Helpers for the tests (fixture files in the datasets' on-disk formats)."""
