"""The App's metrics, in Prometheus form (``prometheus-client``), one registry per App.

Code on the hot path calls ``metrics.inc("events_handled", service=..., event=...)`` or
``metrics.observe("handler_duration_seconds", seconds, ...)``: a dict lookup and a locked add.
Each name is a family ``vmsdb_<name>`` (counters end in ``_total``); a name not declared in
:data:`COUNTERS` becomes a counter on first use, with the labels it was first given.
``value`` and ``snapshot`` read the counters back (tests, ``App.metrics``).

Gauges that live in the database (backlog, dead letters, leases, recovery) are not kept here:
:class:`StateCollector` serves what ``framework._internal.scrape`` read at the last scrape.
Each App has its own ``CollectorRegistry``, so several Apps in one process never collide.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["COUNTERS", "HISTOGRAMS", "Metrics", "StateCollector", "StateFamilies"]

log = logging.getLogger("vmsdb.metrics")

#: Counters: name -> (help, labels). Exposed as ``vmsdb_<name>_total``.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "events_handled": ("Events whose handler committed", ("service", "event")),
    "event_retries": ("Handler failures that were scheduled for another attempt", ("service", "event")),
    "events_failed": ("Handler attempts that failed (retried or dead-lettered)", ("service", "event")),
    "dead_letters": ("Deliveries moved to the dead letters", ("service", "event")),
    "transactions": ("@Transactional calls committed", ("service", "function")),
    "transaction_conflicts": (
        "Transaction attempts that hit a serialization failure or deadlock",
        ("service", "function"),
    ),
    "transaction_retries": ("Transactions retried, by cause", ("service", "function", "cause")),
    "transaction_failures": ("Transactions that ran out of attempts", ("service", "function")),
    "lease_grants": ("Leases granted", ("service", "function")),
    "lease_refusals": ("Leases refused (not enough left)", ("service", "function")),
    "replica_changes": ("Replica rows applied", ("service", "table")),
    "deliveries_handed_off": (
        "Deliveries claimed by their producer's transaction for this App's workers (a hand-off)",
        ("service",),
    ),
    "group_commit_splits": (
        "Groups of deliveries (@Inbound(group_commit=)) rolled back and run again one by one",
        ("service", "event"),
    ),
}

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: Histograms: name -> (help, labels, buckets). Exposed as ``vmsdb_<name>``.
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "handler_duration_seconds": ("Handler run time, transaction included", ("service", "event"), _SECONDS),
    "claim_batch_size": ("Deliveries taken by one claim", ("service",), _SIZES),
    "claim_subscribers": ("Subscribers claimed for by one claim statement", (), _SIZES),
    "group_commit_size": (
        "Deliveries handled in one transaction (@Inbound(group_commit=))",
        ("service",),
        _SIZES,
    ),
}

_Key = tuple[str, tuple[tuple[str, str], ...]]


class StateCollector(Collector):
    """Serves the gauges read from the core at the last scrape (see ``scrape.refresh``)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class StateFamilies:
    """Builds one scrape's families: ``gauge(name, help, labels, value)`` per sample.

    ``counter`` is for totals kept elsewhere (the Kafka relay's and ingress's own counts).
    """

    def __init__(self) -> None:
        self._families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def gauge(self, name: str, documentation: str, labels: dict[str, str], value: float) -> None:
        family = self._families.get(name)
        if family is None:
            family = GaugeMetricFamily(f"vmsdb_{name}", documentation, labels=list(labels))
            self._families[name] = family
        family.add_metric(list(labels.values()), value)

    def counter(self, name: str, documentation: str, value: float) -> None:
        self._families[name] = CounterMetricFamily(f"vmsdb_{name}", documentation, value=value)

    def done(self) -> list[Metric]:
        return list(self._families.values())


class Metrics:
    """Counters and histograms of one App, on the App's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.state = StateCollector()
        self.registry.register(self.state)
        self._counts: Counter[_Key] = Counter()
        self._families: dict[str, Any] = {}
        self._children: dict[_Key, Any] = {}
        for name, (doc, labels) in COUNTERS.items():
            self._families[name] = PromCounter(
                f"vmsdb_{name}", doc, labelnames=labels, registry=self.registry
            )
        for name, (doc, labels, buckets) in HISTOGRAMS.items():
            self._families[name] = Histogram(
                f"vmsdb_{name}", doc, labelnames=labels, buckets=buckets, registry=self.registry
            )

    def _child(self, key: _Key, labels: dict[str, str], kind: str) -> Any:
        child = self._children.get(key)
        if child is not None:
            return child
        name = key[0]
        family = self._families.get(name)
        if family is None and kind == "counter":
            family = PromCounter(
                f"vmsdb_{name}", name.replace("_", " "), labelnames=sorted(labels), registry=self.registry
            )
            self._families[name] = family
        if family is None:
            raise KeyError(f"no histogram named {name!r}; declare it in HISTOGRAMS")
        child = family.labels(**labels) if labels else family
        self._children[key] = child
        return child

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        # Keyed in the caller's label order (one call site, one order): no sort on the hot path;
        # value() and snapshot() do not depend on the order.
        key = (name, tuple(labels.items()))
        self._counts[key] += amount
        try:
            self._child(key, labels, "counter").inc(amount)
        except ValueError as err:  # labels unlike the family's: kept in memory only, said once
            self._children[key] = _Ignored()
            log.warning("metric %s: %s; counted in memory only", name, err)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """One sample of a histogram of :data:`HISTOGRAMS`."""
        self._child((name, tuple(labels.items())), labels, "histogram").observe(value)

    def value(self, name: str, **labels: str) -> int:
        """Sum of counter ``name`` over every label set that includes ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self._counts.items() if n == name and wanted <= set(ls))

    def snapshot(self) -> list[dict[str, object]]:
        merged: Counter[_Key] = Counter()
        for (name, labels), value in self._counts.items():
            merged[(name, tuple(sorted(labels)))] += value
        return [
            {"name": name, "labels": dict(labels), "value": value}
            for (name, labels), value in sorted(merged.items())
        ]

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (the gauges as of the last refresh)."""
        return generate_latest(self.registry)


class _Ignored:
    def inc(self, amount: float = 1) -> None:
        pass
