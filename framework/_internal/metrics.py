"""Counters the framework keeps in memory: transactions, retries, deliveries, dead letters.

Cheap enough for the hot path (a dict update) and exported as plain data by
``App.metrics.snapshot()``, which an HTTP endpoint or a Prometheus exporter can serve.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self._counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self._counters[(name, tuple(sorted(labels.items())))] += amount

    def value(self, name: str, **labels: str) -> int:
        """Sum of ``name`` over every label set that includes ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self._counters.items() if n == name and wanted <= set(ls))

    def snapshot(self) -> list[dict[str, object]]:
        return [
            {"name": name, "labels": dict(labels), "value": value}
            for (name, labels), value in sorted(self._counters.items())
        ]
