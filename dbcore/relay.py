"""The core's side of the Kafka transport: relay cursors, the relay lock, ingress dead letters.

The outbox relay publishes this core's committed events to a broker. It reads ``vms.events`` in
``(xid, position)`` order and only below the snapshot's xmin horizon, exactly like in-database
delivery does (see ``delivery.py``): a sequence value is taken at insert time, not at commit time,
so a transaction that took position 5 may commit after one that took position 7. Reading only
rows whose transaction id is below the xmin of the reading statement's snapshot means every
transaction that could still add an earlier row has finished, so a row that is not visible yet
always sorts *after* the cursor, never before it: the relay never skips a late commit (G3).

Progress is the ``(xid, position)`` of the last event the broker acknowledged, kept in
``vms.relay_cursors`` and only moved forward. One relay publishes at a time: it holds a
session-level advisory lock on its own connection, and runs its reads and cursor updates on that
same connection, so a relay whose connection died (and lost the lock with it) cannot move the
cursor any more.

Events that did not start in this core (``origin`` set: ingested from Kafka) are passed over, so
nothing loops back; the cursor still moves past them so that retention can prune them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.eventlog import dead_letters

__all__ = [
    "START",
    "Cursor",
    "DeadInput",
    "LogRow",
    "advance",
    "backlog",
    "cursor",
    "dead_letter_input",
    "read_batch",
    "try_lock",
]


@dataclass(frozen=True, order=True, slots=True)
class Cursor:
    """A place in the log: the ``(xid, position)`` of an event, compared in that order."""

    xid: int
    position: int

    def __str__(self) -> str:
        return f"{self.xid}/{self.position}"


#: Before the first event: a new relay publishes every event still in the log.
START = Cursor(0, 0)


@dataclass(frozen=True, slots=True)
class LogRow:
    """One event read by the relay. ``relay`` is false for events that came from elsewhere;
    those carry no payload and are only passed over."""

    xid: int
    position: int
    relay: bool
    id: uuid.UUID
    type: str
    key: str | None
    payload: str | None
    producer: str | None
    correlation_id: str | None
    causation_id: uuid.UUID | None
    trace_context: str | None = None

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.xid, self.position)


# Session-level advisory lock, two-key form: (namespace, relay name). Held by the publishing relay
# for as long as its connection lives; Postgres frees it when that connection closes, including
# when the process is killed, and a standby's next try takes it.
_TRY_LOCK = text("SELECT pg_try_advisory_lock(hashtext('vms.relay'), hashtext(:name))")

_CURSOR = text("SELECT xid::text AS xid, position FROM vms.relay_cursors WHERE name = :name")

# Monotonic: a cursor never moves back, whatever order two relays' updates arrive in. Committed
# without waiting for the WAL flush (set where the cursor moved): a move lost in a crash only
# means the batch is published again, which a crash between the acknowledgement and this update
# means anyway (at least once; consumers drop duplicates). The relay's next batch then does not
# wait for an fsync.
_ADVANCE = text(
    """
    INSERT INTO vms.relay_cursors AS c (name, xid, position)
    VALUES (:name, CAST(:xid AS xid8), :position)
    ON CONFLICT (name) DO UPDATE
       SET xid = EXCLUDED.xid, position = EXCLUDED.position, updated_at = now()
     WHERE (c.xid, c.position) < (EXCLUDED.xid, EXCLUDED.position)
    RETURNING set_config('synchronous_commit', 'off', true)
    """
)

# Below the horizon and after the cursor, in (xid, position) order. Run in autocommit, so the
# snapshot (and its xmin) is this statement's own.
_READ = text(
    """
    WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
    SELECT e.xid::text AS xid, e.position, e.origin IS NULL AS relay, e.id, e.type, e.key,
           CASE WHEN e.origin IS NULL THEN e.payload::text END AS payload,
           e.producer, e.correlation_id, e.causation_id, e.trace_context
      FROM vms.events e, horizon h
     WHERE e.xid < h.xmin
       AND (e.xid, e.position) > (CAST(:xid AS xid8), :position)
     ORDER BY e.xid, e.position
     LIMIT :limit
    """
)

_BACKLOG = text(
    """
    SELECT count(*) FROM vms.events e
     WHERE e.origin IS NULL
       AND (e.xid, e.position) > (CAST(:xid AS xid8), :position)
    """
)


async def try_lock(conn: AsyncConnection, name: str) -> bool:
    """Take relay ``name``'s lock for ``conn``'s session if it is free; never waits."""
    return bool((await conn.execute(_TRY_LOCK, {"name": name})).scalar_one())


async def cursor(conn: AsyncConnection, name: str) -> Cursor:
    """Where relay ``name`` stands (:data:`START` if it never published)."""
    row = (await conn.execute(_CURSOR, {"name": name})).first()
    return START if row is None else Cursor(int(row.xid), int(row.position))


async def advance(conn: AsyncConnection, name: str, to: Cursor) -> None:
    """Record that everything up to and including ``to`` is published.

    Meant for an autocommit connection: the statement turns ``synchronous_commit`` off for the
    transaction it runs in (see ``_ADVANCE``).
    """
    await conn.execute(_ADVANCE, {"name": name, "xid": to.xid, "position": to.position})


async def read_batch(conn: AsyncConnection, after: Cursor, limit: int) -> list[LogRow]:
    """Up to ``limit`` finished events after ``after``, oldest first (see the module docstring)."""
    rows = await conn.execute(_READ, {"xid": after.xid, "position": after.position, "limit": limit})
    return [
        LogRow(
            xid=int(r.xid),
            position=int(r.position),
            relay=bool(r.relay),
            id=r.id,
            type=r.type,
            key=r.key,
            payload=r.payload,
            producer=r.producer,
            correlation_id=r.correlation_id,
            causation_id=r.causation_id,
            trace_context=r.trace_context,
        )
        for r in rows
    ]


async def backlog(conn: AsyncConnection, name: str) -> int:
    """How many events of this core relay ``name`` has not published yet."""
    at = await cursor(conn, name)
    return int((await conn.execute(_BACKLOG, {"xid": at.xid, "position": at.position})).scalar_one())


@dataclass(frozen=True, slots=True)
class DeadInput:
    """Input from outside that cannot become an event: kept as received, with the reason."""

    subscriber: str
    event_type: str
    key: str | None
    raw: str
    source: str
    error: str


async def dead_letter_input(conn: AsyncConnection, letters: Sequence[DeadInput]) -> None:
    """Store undecodable input in ``vms.dead_letters`` (no log position: it never was an event)."""
    if not letters:
        return
    await conn.execute(
        insert(dead_letters),
        [
            {
                "subscriber": d.subscriber,
                "event_type": d.event_type,
                "key": d.key,
                "raw": d.raw,
                "source": d.source,
                "error": d.error,
                "attempts": 1,
            }
            for d in letters
        ],
    )
