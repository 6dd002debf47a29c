"""What the core can tell about itself while it runs: backlog, dead letters, leases, recovery.

Read by the metrics collector at scrape time and by the dashboard. Every query is short and
bounded by what is *pending* (deliveries, active leases, unreplayed dead letters), never by the
size of the log: handled events are only looked up by primary key or by an indexed correlation
id, and the recent-traffic count scans at most the log's retention window.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "ChainEvent",
    "DeadLetter",
    "Delivery",
    "LeaseCount",
    "SubscriberBacklog",
    "active_leases",
    "amnesia_intervals",
    "backlog",
    "correlation_chain",
    "dead_letter_counts",
    "dead_letters",
    "lease_counts",
    "recoveries",
    "recovery_modes",
    "relay_lag",
    "traffic",
]


@dataclass(frozen=True, slots=True)
class SubscriberBacklog:
    """One subscriber's pending work: deliveries waiting (per event type) and the oldest's age."""

    subscriber: str
    event_type: str
    pending: int
    #: Parked behind a blocking dead letter: they wait for a person, not for the workers.
    parked: int
    #: Age in seconds of the oldest waiting event (by log position), 0 when nothing waits.
    oldest_seconds: float


# Grouped first, then one primary-key lookup per group for the oldest event's time.
_BACKLOG = text(
    """
    WITH g AS (
        SELECT subscriber, event_type,
               count(*) FILTER (WHERE available_at < 'infinity') AS pending,
               count(*) FILTER (WHERE available_at = 'infinity') AS parked,
               min(position) FILTER (WHERE available_at < 'infinity') AS oldest
          FROM vms.deliveries GROUP BY subscriber, event_type
    )
    SELECT g.subscriber, g.event_type, g.pending, g.parked,
           coalesce(extract(epoch FROM clock_timestamp() - e.created_at), 0)::float8 AS age
      FROM g LEFT JOIN vms.events e ON e.position = g.oldest
     ORDER BY g.subscriber, g.event_type
    """
)


async def backlog(conn: AsyncConnection) -> list[SubscriberBacklog]:
    """Pending deliveries per (subscriber, event type)."""
    rows = (await conn.execute(_BACKLOG)).all()
    return [SubscriberBacklog(r[0], r[1], int(r[2]), int(r[3]), max(float(r[4]), 0.0)) for r in rows]


_DEAD_LETTER_COUNTS = text(
    "SELECT subscriber, event_type, count(*) FROM vms.dead_letters WHERE replayed_at IS NULL "
    "GROUP BY subscriber, event_type ORDER BY 1, 2"
)


async def dead_letter_counts(conn: AsyncConnection) -> list[tuple[str, str, int]]:
    """Unsettled dead letters per (subscriber, event type)."""
    return [(r[0], r[1], int(r[2])) for r in (await conn.execute(_DEAD_LETTER_COUNTS)).all()]


@dataclass(frozen=True, slots=True)
class LeaseCount:
    service: str
    function: str
    active: int
    #: Active but past their expiry: their quantity returns at the next grant or reap.
    expired: int


_LEASE_COUNTS = text(
    """
    SELECT service, function, count(*) AS active,
           count(*) FILTER (WHERE expires_at <= vms.now()) AS expired
      FROM vms.leases WHERE status = 'active'
     GROUP BY service, function ORDER BY service, function
    """
)


async def lease_counts(conn: AsyncConnection) -> list[LeaseCount]:
    """Active and expired-but-unsettled leases per lease function."""
    return [LeaseCount(r[0], r[1], int(r[2]), int(r[3])) for r in (await conn.execute(_LEASE_COUNTS)).all()]


_RECOVERY_MODES = text("SELECT service, recovering FROM vms.ref_services ORDER BY service")


async def recovery_modes(conn: AsyncConnection) -> dict[str, str | None]:
    """Each service known to the reference catalog, and its recovery mode (``None``: serving)."""
    return {r[0]: r[1] for r in (await conn.execute(_RECOVERY_MODES)).all()}


# The oldest event that started here and is past the cursor: found through the (xid, position)
# index, one row.
_RELAY_LAG = text(
    """
    SELECT c.name,
           coalesce(extract(epoch FROM clock_timestamp() - (
               SELECT e.created_at FROM vms.events e
                WHERE (e.xid, e.position) > (c.xid, c.position) AND e.origin IS NULL
                ORDER BY e.xid, e.position LIMIT 1)), 0)::float8
      FROM vms.relay_cursors c ORDER BY c.name
    """
)


async def relay_lag(conn: AsyncConnection) -> dict[str, float]:
    """Per relay cursor: age in seconds of the oldest event it has not published (0: none)."""
    return {r[0]: max(float(r[1]), 0.0) for r in (await conn.execute(_RELAY_LAG)).all()}


_TRAFFIC = text(
    """
    SELECT coalesce(producer, ''), type, count(*) FROM vms.events
     WHERE created_at > clock_timestamp() - make_interval(secs => :seconds)
     GROUP BY 1, 2 ORDER BY 1, 2
    """
)


async def traffic(conn: AsyncConnection, seconds: float) -> list[tuple[str | None, str, int]]:
    """Events appended in the last ``seconds``, per (producer, type); producer ``None``: outside."""
    rows = (await conn.execute(_TRAFFIC, {"seconds": seconds})).all()
    return [(r[0] or None, r[1], int(r[2])) for r in rows]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one event at one subscriber."""

    subscriber: str
    #: "handled", "pending", "retrying", "dead-letter" or "parked".
    state: str
    #: ``None`` for a handled event: its delivery row, which counted them, is gone.
    attempts: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ChainEvent:
    position: int
    id: uuid.UUID
    type: str
    producer: str | None
    causation_id: uuid.UUID | None
    created_at: datetime
    origin: str | None
    payload: Any
    deliveries: tuple[Delivery, ...]


# Causal order is log order: a handler's events are inserted by a transaction that began after
# the event it handles was committed and below every reader's horizon, so (xid, position)
# sorts every cause before its effects.
_CHAIN = text(
    """
    SELECT position, id, type, producer, causation_id, created_at, origin, payload
      FROM vms.events WHERE correlation_id = :c ORDER BY xid, position LIMIT :limit
    """
)
_CHAIN_SUBSCRIBERS = text("SELECT event_type, service FROM vms.subscriptions WHERE event_type = ANY(:t)")
_CHAIN_PENDING = text(
    "SELECT position, subscriber, attempts, available_at = 'infinity' AS parked, last_error "
    "FROM vms.deliveries WHERE position = ANY(:p)"
)
_CHAIN_LETTERS = text(
    "SELECT position, subscriber, attempts, error, replayed_at IS NOT NULL AS settled "
    "FROM vms.dead_letters WHERE position = ANY(:p) ORDER BY id"
)


async def correlation_chain(conn: AsyncConnection, correlation_id: str, limit: int = 500) -> list[ChainEvent]:
    """The events of one correlation in causal order, each with its outcome per subscriber.

    A subscriber with neither a delivery row nor an unsettled dead letter has handled the event
    (the delivery row is deleted in the handler's own transaction).
    """
    rows = (await conn.execute(_CHAIN, {"c": correlation_id, "limit": limit})).all()
    if not rows:
        return []
    positions = [r.position for r in rows]
    subscribers: dict[str, list[str]] = {}
    for event_type, service in (
        await conn.execute(_CHAIN_SUBSCRIBERS, {"t": list({r.type for r in rows})})
    ).all():
        subscribers.setdefault(event_type, []).append(service)
    pending = {(r.position, r.subscriber): r for r in (await conn.execute(_CHAIN_PENDING, {"p": positions}))}
    letters: dict[tuple[int, str], Any] = {}
    for r in await conn.execute(_CHAIN_LETTERS, {"p": positions}):
        letters[(r.position, r.subscriber)] = r  # the latest letter of a pair wins
    chain = []
    for r in rows:
        outcomes = []
        for subscriber in sorted(subscribers.get(r.type, [])):
            p = pending.get((r.position, subscriber))
            letter = letters.get((r.position, subscriber))
            if p is not None and p.parked:
                outcomes.append(Delivery(subscriber, "parked", p.attempts, p.last_error))
            elif p is not None:
                state = "retrying" if p.last_error else "pending"
                outcomes.append(Delivery(subscriber, state, p.attempts, p.last_error))
            elif letter is not None and not letter.settled:
                outcomes.append(Delivery(subscriber, "dead-letter", letter.attempts, letter.error))
            else:
                outcomes.append(Delivery(subscriber, "handled", None, None))
        chain.append(
            ChainEvent(
                r.position,
                r.id,
                r.type,
                r.producer,
                r.causation_id,
                r.created_at,
                r.origin,
                r.payload,
                tuple(outcomes),
            )
        )
    return chain


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    subscriber: str
    event_id: uuid.UUID | None
    event_type: str
    key: str | None
    error: str
    traceback: str | None
    attempts: int
    blocking: bool
    failed_at: datetime
    source: str


_DEAD_LETTERS = text(
    """
    SELECT id, subscriber, event_id, event_type, key, error, traceback, attempts, blocking,
           failed_at, source
      FROM vms.dead_letters WHERE replayed_at IS NULL ORDER BY id LIMIT :limit
    """
)


async def dead_letters(conn: AsyncConnection, limit: int = 200) -> list[DeadLetter]:
    """Unsettled dead letters, oldest first (replay or discard settles one)."""
    return [DeadLetter(*r) for r in (await conn.execute(_DEAD_LETTERS, {"limit": limit})).all()]


_ACTIVE_LEASES = text(
    """
    SELECT service, function, entity, key_text, quantity, holder, expires_at,
           expires_at <= vms.now() AS expired
      FROM vms.leases WHERE status = 'active'
     ORDER BY service, entity, key_text, expires_at LIMIT :limit
    """
)


async def active_leases(conn: AsyncConnection, limit: int = 500) -> list[dict[str, Any]]:
    """Active leases per service and entity (as rows of plain values)."""
    return [dict(r._mapping) for r in (await conn.execute(_ACTIVE_LEASES, {"limit": limit})).all()]


_RECOVERIES = text(
    """
    SELECT id, service, mode, epoch, backup_epoch, status, expected, answered, started_at, completed_at
      FROM vms.recoveries ORDER BY started_at DESC LIMIT :limit
    """
)
_AMNESIA = text(
    """
    SELECT service, uri, recovery_id, from_epoch, to_epoch, lo, hi, recovered_from
      FROM vms.amnesia ORDER BY id DESC LIMIT :limit
    """
)


async def recoveries(conn: AsyncConnection, limit: int = 20) -> list[dict[str, Any]]:
    """The latest recoveries (restores into a new epoch), newest first."""
    return [dict(r._mapping) for r in (await conn.execute(_RECOVERIES, {"limit": limit})).all()]


async def amnesia_intervals(conn: AsyncConnection, limit: int = 200) -> list[dict[str, Any]]:
    """Recorded amnesia intervals ``]lo, hi]`` (``uri`` ``None``: entities the backup did not
    know; ``hi`` ``None``: open until the entity's first access), newest first."""
    return [dict(r._mapping) for r in (await conn.execute(_AMNESIA, {"limit": limit})).all()]
