"""Benchmarks: ``python -m perf NAME [--json]`` from the repository root."""
