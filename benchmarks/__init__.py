"""Measured comparisons of vmsdb against hand-written baselines: ``python -m vmsdb_bench NAME``.

Each benchmark measures the framework and a hand-written asyncpg baseline in the same run, prints
a table of both and their ratio, and writes the numbers as JSON. Nothing here asserts timings.
"""

from vmsdb_bench.harness import BenchmarkResult

__all__ = ["BenchmarkResult"]
