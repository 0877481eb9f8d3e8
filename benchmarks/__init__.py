"""Ratio benchmarks: run them all with ``python -m benchmarks``."""
