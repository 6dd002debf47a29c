"""Serving an App's metrics: the gauges read from the core at scrape time, and the endpoints.

A scrape reads the core's state (``dbcore.stats``: backlog, dead letters, leases, recovery, relay
cursor) in one short read-only transaction with a statement timeout, adds what the process knows
(pool, Kafka relay and ingress), and renders the App's registry. ``metrics_route`` puts it on a
FastAPI application (``framework.fastapi.attach`` does); ``metrics_api`` is one of its own
(``vmsdb run --metrics-port``, with ``framework._internal.serving``).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from dbcore import stats
from framework._internal.metrics import StateFamilies

if TYPE_CHECKING:
    from fastapi import FastAPI

    from framework._internal.app import App

__all__ = ["exposition", "metrics_api", "metrics_route", "refresh"]

#: A scrape must never hold the core up: each of its statements gets this long.
_STATEMENT_TIMEOUT = text("SET LOCAL statement_timeout = '2s'")
_MODES = ("none", "availability", "consistency")
_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


async def refresh(app: App) -> None:
    """Read the core's state into ``app.metrics``' gauges."""
    families = StateFamilies()
    async with app.core.admin() as conn:
        await conn.execute(_STATEMENT_TIMEOUT)
        backlog = await stats.backlog(conn)
        letters = await stats.dead_letter_counts(conn)
        leases = await stats.lease_counts(conn)
        modes = await stats.recovery_modes(conn)
        relay = await stats.relay_lag(conn)
    mine = {d.name for d in app.descriptors}

    # Every subscription of this App shows, at 0 when nothing waits: absent is not the same as 0.
    pending = {(d.name, i.event): 0 for d in app.descriptors for i in d.inbound}
    parked: dict[tuple[str, str], int] = {}
    lag = {d.name: 0.0 for d in app.descriptors if d.inbound}
    for b in backlog:
        if b.subscriber not in mine:
            continue
        pending[(b.subscriber, b.event_type)] = b.pending
        parked[(b.subscriber, b.event_type)] = b.parked
        lag[b.subscriber] = max(lag.get(b.subscriber, 0.0), b.oldest_seconds if b.pending else 0.0)
    for (subscriber, event), n in sorted(pending.items()):
        labels = {"subscriber": subscriber, "event": event}
        families.gauge("deliveries_pending", "Deliveries waiting for a handler", labels, n)
        families.gauge(
            "deliveries_parked",
            "Deliveries held behind a blocking dead letter",
            labels,
            parked.get((subscriber, event), 0),
        )
    for subscriber, seconds in sorted(lag.items()):
        families.gauge(
            "delivery_lag_seconds", "Age of the oldest pending delivery", {"subscriber": subscriber}, seconds
        )
    unsettled = {(d.name, i.event): 0 for d in app.descriptors for i in d.inbound}
    for subscriber, event, n in letters:
        if subscriber in mine:
            unsettled[(subscriber, event)] = n
    for (subscriber, event), n in sorted(unsettled.items()):
        families.gauge(
            "dead_letters_unsettled",
            "Dead letters neither replayed nor discarded",
            {"subscriber": subscriber, "event": event},
            n,
        )
    for lc in leases:
        labels = {"service": lc.service, "function": lc.function}
        families.gauge("leases_active", "Active leases (expired ones included)", labels, lc.active)
        families.gauge(
            "leases_expired", "Active leases past their expiry, not yet given back", labels, lc.expired
        )
    for name in sorted(mine):
        mode = modes.get(name) or "none"
        for candidate in _MODES:
            families.gauge(
                "recovery_mode",
                "1 for the service's current recovery mode",
                {"service": name, "mode": candidate},
                1.0 if candidate == mode else 0.0,
            )
    for cursor, seconds in relay.items():
        families.gauge(
            "relay_lag_seconds",
            "Age of the oldest event the relay has not published",
            {"relay": cursor},
            seconds,
        )
    _process(app, families)
    app.metrics.state.families = families.done()


def _process(app: App, families: StateFamilies) -> None:
    """What only this process knows: its connection pool, its Kafka relay and ingress."""
    for login, pool in app.core.pools().items():  # the administrator's, the core's, each service's
        for state, reader in (("checked_out", "checkedout"), ("idle", "checkedin"), ("overflow", "overflow")):
            read = getattr(pool, reader, None)
            if read is not None:
                families.gauge(
                    "pool_connections", "Pooled database connections",
                    {"pool": login, "state": state}, max(read(), 0),
                )  # fmt: skip
        size = getattr(pool, "size", None)
        if size is not None:
            families.gauge("pool_size", "Configured size of the connection pool", {"pool": login}, size())
    kafka = app.kafka
    if kafka is None:
        return
    if kafka.relay is not None:
        families.counter(
            "relay_published", "Events this process's relay published to Kafka", kafka.relay.published
        )
    if kafka.ingress is not None:
        families.counter(
            "ingress_events", "Events the Kafka ingress inserted into the log", kafka.ingress.ingested
        )
        for tp, offset in sorted(kafka.ingress.committed.items()):
            families.gauge(
                "ingress_committed_offset",
                "Next offset the ingress reads, as committed to Kafka",
                {"topic": tp.topic, "partition": str(tp.partition)},
                offset,
            )


async def exposition(app: App) -> bytes:
    """The App's metrics in Prometheus text format, the core's state read now."""
    lock = _locks.setdefault(app.metrics, asyncio.Lock())
    async with lock:  # concurrent scrapes read once each, never interleaved
        await refresh(app)
        return app.metrics.exposition()


def metrics_route(api: FastAPI, app: App, path: str = "/metrics") -> None:
    """Serve ``app``'s metrics on ``path`` of ``api`` (left out of the OpenAPI schema)."""
    from fastapi.responses import Response

    async def metrics() -> Response:
        return Response(await exposition(app), media_type=CONTENT_TYPE_LATEST)

    api.add_api_route(path, metrics, methods=["GET"], include_in_schema=False)


def metrics_api(app: App) -> FastAPI:
    """A FastAPI application serving only ``app``'s ``/metrics`` (``vmsdb run --metrics-port``)."""
    from fastapi import FastAPI

    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    metrics_route(api, app)
    return api
