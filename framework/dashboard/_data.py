"""What the dashboard shows, as JSON-ready dicts: read from the App's descriptors and its core.

Everything here reads, except :func:`settle_dead_letter`, which runs the same core functions as
``vmsdb dead-letters replay|discard``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import text

from dbcore import delivery, stats
from dbcore.descriptor import ServiceDescriptor
from framework._internal.dataflow import OUTSIDE, dataflow

if TYPE_CHECKING:
    from framework._internal.app import App

__all__ = [
    "TRAFFIC_WINDOW",
    "chain",
    "dead_letters",
    "graph",
    "integrity",
    "leases",
    "recovery",
    "settle_dead_letter",
]

#: Edge rates are events per second over this many seconds of the log.
TRAFFIC_WINDOW = 60.0
#: Every dashboard read gets this long per statement: the page must never hold the core up.
_STATEMENT_TIMEOUT = text("SET LOCAL statement_timeout = '3s'")


def _plain(value: Any) -> Any:
    """JSON-ready: datetimes as ISO text, UUIDs and decimals as text, dataclasses as dicts."""
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _limits_of(descriptor: ServiceDescriptor) -> dict[str, Any]:
    """A service's declared limits (``ServiceLimits``, from its descriptor), those it sets."""
    return {k: v for k, v in descriptor.limits.model_dump().items() if v is not None}


async def graph(app: App) -> dict[str, Any]:
    """Services as nodes (with lag and limits), flows as edges (with rate and pending count)."""
    async with app.core.admin() as conn:
        await conn.execute(_STATEMENT_TIMEOUT)
        backlog = await stats.backlog(conn)
        recent = await stats.traffic(conn, TRAFFIC_WINDOW)
        letters = await stats.dead_letter_counts(conn)
        modes = await stats.recovery_modes(conn)
    pending = {(b.subscriber, b.event_type): b.pending + b.parked for b in backlog}
    lag: dict[str, float] = defaultdict(float)
    for b in backlog:
        if b.pending:
            lag[b.subscriber] = max(lag[b.subscriber], b.oldest_seconds)
    dead: dict[str, int] = defaultdict(int)
    for subscriber, _event, n in letters:
        dead[subscriber] += n
    rates = {(producer or OUTSIDE, event): n / TRAFFIC_WINDOW for producer, event, n in recent}
    flows = dataflow(app.descriptors)
    nodes = [
        {
            "id": plan.descriptor.name,
            "tables": len(plan.descriptor.tables),
            "handlers": len(plan.descriptor.inbound),
            "lag_seconds": round(lag[plan.descriptor.name], 3),
            "dead_letters": dead[plan.descriptor.name],
            "recovering": modes.get(plan.descriptor.name),
            "limits": _limits_of(plan.descriptor),
        }
        for plan in app.plans
    ]
    if any(OUTSIDE in (f.producer, f.consumer) for f in flows):
        nodes.append({"id": OUTSIDE, "outside": True})
    edges = []
    seen: set[tuple[str, str, str]] = set()
    for f in flows:
        key = (f.producer, f.consumer, f.event)
        if key in seen:
            continue
        seen.add(key)
        edges.append(
            {
                "id": "|".join(key),
                "source": f.producer,
                "target": f.consumer,
                "event": f.event,
                "handler": f.handler,
                "precedence": list(f.precedence),
                "rate": round(rates.get((f.producer, f.event), 0.0), 3),
                "pending": pending.get((f.consumer, f.event), 0),
            }
        )
    totals = {
        "pending": sum(b.pending for b in backlog),
        "rate": round(sum(n for _p, _e, n in recent) / TRAFFIC_WINDOW, 3),
        "dead_letters": sum(dead.values()),
        "at": time.time(),
    }
    return {"nodes": nodes, "edges": edges, "totals": totals, "window_seconds": TRAFFIC_WINDOW}


async def chain(app: App, correlation_id: str) -> dict[str, Any]:
    """One correlation's events in causal order, with hop times and outcomes per subscriber."""
    async with app.core.admin() as conn:
        await conn.execute(_STATEMENT_TIMEOUT)
        events = await stats.correlation_chain(conn, correlation_id)
    if not events:
        return {"correlation_id": correlation_id, "events": []}
    start = events[0].created_at
    created = {e.id: e.created_at for e in events}
    depth: dict[Any, int] = {}
    rows = []
    for e in events:
        cause = created.get(e.causation_id) if e.causation_id is not None else None
        depth[e.id] = depth[e.causation_id] + 1 if e.causation_id in depth else 0
        rows.append(
            {
                "position": e.position,
                "id": str(e.id),
                "type": e.type,
                "producer": e.producer or OUTSIDE,
                "origin": e.origin,
                "causation_id": None if e.causation_id is None else str(e.causation_id),
                "depth": depth[e.id],
                "created_at": e.created_at.isoformat(),
                "offset_ms": round((e.created_at - start).total_seconds() * 1000, 1),
                "hop_ms": None if cause is None else round((e.created_at - cause).total_seconds() * 1000, 1),
                "deliveries": [_plain(d) for d in e.deliveries],
            }
        )
    outcome = "done"
    states = {d.state for e in events for d in e.deliveries}
    if states & {"dead-letter", "parked"}:
        outcome = "failed"
    elif states & {"pending", "retrying"}:
        outcome = "in progress"
    return {"correlation_id": correlation_id, "events": rows, "outcome": outcome}


async def dead_letters(app: App) -> list[dict[str, Any]]:
    async with app.core.admin() as conn:
        await conn.execute(_STATEMENT_TIMEOUT)
        return [_plain(letter) for letter in await stats.dead_letters(conn)]


async def settle_dead_letter(app: App, letter_id: int, action: Literal["replay", "discard"]) -> bool:
    """Replay or discard one dead letter (``dbcore.delivery``, as ``vmsdb dead-letters`` does)."""
    async with app.core.admin() as conn:
        if action == "replay":
            return await delivery.replay(conn, letter_id)
        return await delivery.discard(conn, letter_id)


async def leases(app: App) -> list[dict[str, Any]]:
    async with app.core.admin() as conn:
        await conn.execute(_STATEMENT_TIMEOUT)
        return [_plain(row) for row in await stats.active_leases(conn)]


async def recovery(app: App) -> dict[str, Any]:
    """Each service's recovery mode, the latest recoveries and the recorded amnesia intervals."""
    async with app.core.admin() as conn:
        await conn.execute(_STATEMENT_TIMEOUT)
        modes = await stats.recovery_modes(conn)
        latest = await stats.recoveries(conn)
        intervals = await stats.amnesia_intervals(conn)
    services = [{"service": d.name, "mode": modes.get(d.name)} for d in app.descriptors]
    return {"services": services, "recoveries": _plain(latest), "amnesia": _plain(intervals)}


async def integrity(app: App) -> dict[str, Any]:
    """Definitions 1 and 3 over one snapshot (``vmsdb integrity check``), with when it ran."""
    from framework import references  # lazy: the checker loads the whole reference catalog

    report = await references.check(app.host)
    verdict = (
        "globally consistent"
        if report.globally_consistent
        else "weakly consistent"
        if report.weakly_consistent
        else "not consistent"
    )
    return {
        "verdict": verdict,
        "checked_at": datetime.now().astimezone().isoformat(),
        "violations": len(report.violations),
        "uncovered": len(report.uncovered),
        "local_problems": len(report.local),
        "repairs": len(report.repairs),
    }
