"""Datasets, metrics and the quality and speed benchmarks."""
