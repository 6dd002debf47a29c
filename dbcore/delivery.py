"""In-database delivery: claiming deliveries in order, acknowledging, retrying, dead-lettering.

A worker *claims* a batch in one statement (its own transaction): it stamps each row with a
random claim token and a deadline. It then runs each handler in the handler's own transaction
(under the subscriber's role, at the handler's isolation level), and that transaction deletes the
delivery row *by claim token* before it commits: the handler's effects and the "handled" mark
commit together, exactly once (G4). A live worker renews its claims (a heartbeat, ``renew``),
so a claim lasts a few seconds unless renewed, and never past the worker's claim timeout: if the
worker dies (kill -9), its claims run out within those seconds and another worker claims the
rows again; if a slow worker's claim ran out and another took over, the slow one's delete finds
no row with its token and it rolls back, so a redelivered event still takes effect once.

Why the claim is not the handler's own ``SELECT ... FOR UPDATE SKIP LOCKED``: handlers may run
SERIALIZABLE, and scanning the shared deliveries table inside serializable transactions would
make unrelated handlers fail each other with serialization errors.

A row is claimable only when (each condition is what keeps a guarantee):
- its transaction id is below the snapshot's xmin: every transaction that could still commit an
  earlier event has finished (G3: no gaps, nothing overtaken by a late commit);
- no earlier delivery for the same subscriber and partition key is still pending or claimed
  (G5: FIFO per key; later keys run in parallel);
- no earlier delivery of a type declared to precede it is still pending (G5: precedence);
- it is not claimed by a live claim and its retry backoff has passed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import quote_literal
from dbcore.errors import CoreError
from dbcore.eventlog import CLAIM_LOST_SQLSTATE, NOTIFY_CHANNEL, dead_letters
from dbcore.translate import sqlstate_of

__all__ = [
    "HANDED_OFF_POSITION",
    "Ack",
    "Claim",
    "ClaimLost",
    "ClaimRequest",
    "Claimed",
    "DeadLetter",
    "GroupAck",
    "claim",
    "claim_batches",
    "dead_letter",
    "discard",
    "held_back",
    "list_dead_letters",
    "pending_count",
    "release",
    "renew",
    "replay",
    "resolve",
    "retry_later",
]


#: ``Claimed.position`` of a delivery handed off by its producer (``eventlog.FAN_OUT_FUNCTION``):
#: the App that claimed it knows its event, not its position (positions start at 1).
HANDED_OFF_POSITION = 0


@dataclass(frozen=True, slots=True)
class Claimed:
    subscriber: str
    position: int
    event_id: uuid.UUID
    event_type: str
    key: str | None
    payload: Any
    correlation_id: str | None
    attempts: int
    claim: uuid.UUID
    created_at: datetime
    #: Another delivery of the same key waits behind this one (claimable once this one is done).
    followed: bool = False
    #: The sender's W3C traceparent, when it was traced.
    trace_context: str | None = None

    @property
    def handed_off(self) -> bool:
        """Claimed by its producer's transaction, position unknown (see :func:`resolve`)."""
        return self.position == HANDED_OFF_POSITION


# Why each condition is there: see the module docstring. A claim for one subscriber is the
# plain statement (_CLAIM_ONE); a claim for several (_CLAIM_MANY) is one lateral claim each, in
# one snapshot, each with its own limit. They share their conditions and their result's shape.
# The precedence clause is left out when no subscriber asked for declares a precedence (it would
# scan every earlier delivery for nothing).
_CLAIMABLE = """
                 WHERE d.subscriber = {subscriber}
                   AND d.xid < h.xmin
                   AND d.available_at <= now()
                   AND (d.claim IS NULL OR d.claimed_until < now())
                   AND NOT EXISTS (
                        SELECT 1 FROM vms.deliveries e
                         WHERE e.subscriber = d.subscriber AND e.key = d.key
                           AND (e.xid, e.position) < (d.xid, d.position)){precedence}
                 ORDER BY d.xid, d.position
                 LIMIT {limit}
                 FOR UPDATE OF d SKIP LOCKED"""
_PRECEDENCE = """
                   AND ({unless}NOT EXISTS (
                        SELECT 1 FROM vms.subscriptions s
                          JOIN vms.deliveries p
                            ON p.subscriber = s.service AND p.event_type = s.event_type
                         WHERE s.service = d.subscriber AND d.event_type = ANY(s.precedence)
                           AND (p.xid, p.position) < (d.xid, d.position)))"""
# The claim's transaction commits without waiting for its WAL to reach disk (synchronous_commit
# off), set where rows were claimed. That is safe: a claim lost in a crash leaves its delivery
# unclaimed, as if never claimed, and a handler's commit that deletes the delivery by this claim
# is flushed after the claim (WAL is flushed in order): no durable "handled" can rest on a lost
# claim.
_CLAIMED = """
        RETURNING d.subscriber, d.position, d.xid, d.event_type, d.key, d.attempts, d.claim,
                  set_config('synchronous_commit', 'off', true) AS asynchronous_commit"""
# The horizon check in the claim's own snapshot: are deliveries waiting only for an older
# transaction to end? Asked separately, a horizon that moved in between would answer "no" for a
# row this claim could not take, and that row would wait for the fallback poll. And are
# deliveries left behind an earlier one of their key (or of a type that precedes them) that is
# still running? Then a finished delivery is worth another claim. Without it, an event that
# commits while its key's head runs (after the head's claim, so the head is not "followed")
# would wait for the fallback poll.
_HELD = """
               EXISTS (
                SELECT 1 FROM vms.deliveries x, horizon h
                 WHERE x.subscriber = {subscriber} AND x.xid >= h.xmin AND x.available_at <= now()
                   AND (x.claim IS NULL OR x.claimed_until < now())) AS held_back,
               EXISTS (
                SELECT 1 FROM vms.deliveries x, horizon h
                 WHERE x.subscriber = {subscriber} AND x.xid < h.xmin AND x.available_at <= now()
                   AND (x.claim IS NULL OR x.claimed_until < now())
                   AND x.position <> ALL(ARRAY({ready}))) AS blocked"""
# One row per subscriber even when nothing was claimed for it (all NULL but the last four).
_RESULT = """
    SELECT c.subscriber, c.position, ev.id AS event_id, c.event_type, c.key,
           ev.payload::text AS payload, ev.correlation_id, c.attempts, c.claim, ev.created_at,
           EXISTS (SELECT 1 FROM vms.deliveries n
                    WHERE n.subscriber = c.subscriber AND n.key = c.key
                      AND (n.xid, n.position) > (c.xid, c.position)) AS followed,
           ev.trace_context, held.subscriber AS wanted, held.held_back, held.blocked,
           -- The horizon itself, for HorizonWatch (no statement of its own per claim).
           (SELECT h.xmin::text FROM horizon h) AS horizon
      FROM held LEFT JOIN (claimed c JOIN vms.events ev ON ev.position = c.position)
        ON c.subscriber = held.subscriber
     ORDER BY held.subscriber, c.xid, c.position
"""
_CLAIM_ONE = (
    """
    WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
    ready AS (
        SELECT d.position FROM vms.deliveries d, horizon h"""
    + _CLAIMABLE.format(subscriber="$1", precedence="{precedence}", limit="$2")
    + """
    ),
    claimed AS (
        -- By primary key: the planner then never scans the whole backlog to apply the claim.
        UPDATE vms.deliveries d
           SET claim = $3, claimed_until = now() + make_interval(secs => $4),
               attempts = d.attempts + 1
         WHERE d.subscriber = $1 AND d.position = ANY(ARRAY(SELECT position FROM ready))"""
    + _CLAIMED
    + """
    ),
    held AS (
        SELECT $1::text AS subscriber,"""
    + _HELD.format(subscriber="$1", ready="SELECT position FROM ready")
    + """
    )"""
    + _RESULT
)
_CLAIM_MANY = (
    """
    WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
    wanted AS (
        SELECT * FROM unnest($1::text[], $2::integer[], $3::boolean[]) AS w(subscriber, lim, precedence)
    ),
    ready AS (
        SELECT w.subscriber, r.position
          FROM wanted w CROSS JOIN LATERAL (
                SELECT d.position FROM vms.deliveries d, horizon h"""
    + _CLAIMABLE.format(subscriber="w.subscriber", precedence="{precedence}", limit="w.lim")
    + """) r
    ),
    claimed AS (
        -- By primary key (both columns = ANY, then the exact pairs): the planner then never
        -- scans the whole backlog to apply the claim.
        UPDATE vms.deliveries d
           SET claim = $4, claimed_until = now() + make_interval(secs => $5),
               attempts = d.attempts + 1
         WHERE d.subscriber = ANY(ARRAY(SELECT DISTINCT subscriber FROM ready))
           AND d.position = ANY(ARRAY(SELECT position FROM ready))
           AND EXISTS (SELECT 1 FROM ready r WHERE r.subscriber = d.subscriber AND r.position = d.position)"""
    + _CLAIMED
    + """
    ),
    -- Materialized: computed once per subscriber, not once per row of the result.
    held AS MATERIALIZED (
        SELECT w.subscriber,"""
    + _HELD.format(
        subscriber="w.subscriber", ready="SELECT r.position FROM ready r WHERE r.subscriber = w.subscriber"
    )
    + """
          FROM wanted w
    )"""
    + _RESULT
)
#: By (several subscribers, with a precedence clause).
_CLAIMS = {
    (many, precedence): sql.format(
        precedence=_PRECEDENCE.format(unless="NOT w.precedence OR " if many else "") if precedence else ""
    )
    for many, sql in ((False, _CLAIM_ONE), (True, _CLAIM_MANY))
    for precedence in (False, True)
}


async def driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn``: the hot path skips SQLAlchemy's statement layer."""
    return (await conn.get_raw_connection()).driver_connection


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim statement took, and what it saw of the horizon."""

    items: list[Claimed]
    #: Deliveries left behind only because an older transaction is still open (the horizon),
    #: seen in the claim's own snapshot: poll soon, no notification will say when it ends.
    held_back: bool
    #: Deliveries left behind an earlier delivery of their key, or of a type that precedes
    #: them, still running: claim again when one finishes.
    blocked: bool
    #: The snapshot horizon the claim saw (``pg_snapshot_xmin`` as text).
    horizon: str


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One subscriber's part of a claim: up to ``limit`` deliveries; ``precedence=False`` when
    the subscriber declares no precedence constraint."""

    subscriber: str
    limit: int
    precedence: bool = True


async def claim_batches(
    conn: AsyncConnection, requests: Sequence[ClaimRequest], *, lease_seconds: float
) -> dict[str, Claim]:
    """For each request (one per subscriber), claim up to its limit of the subscriber's
    deliveries, oldest first, at most one per key, and say whether others wait behind the
    horizon: all in one statement, in one snapshot.

    Meant for an autocommit connection: when rows are claimed, the statement turns
    ``synchronous_commit`` off for the transaction it runs in (see ``_CLAIM``).
    """
    lease = float(lease_seconds)
    if len(requests) == 1:  # planned once per connection; the lateral form is planned per call
        (one,) = requests
        rows = await (await driver(conn)).fetch(
            _CLAIMS[False, one.precedence], one.subscriber, one.limit, uuid.uuid4(), lease
        )
    else:
        rows = await (await driver(conn)).fetch(
            _CLAIMS[True, any(r.precedence for r in requests)],
            [r.subscriber for r in requests],
            [r.limit for r in requests],
            [r.precedence for r in requests],
            uuid.uuid4(),
            lease,
        )
    # The query's columns are the dataclass's fields, in order, then the subscriber asked for,
    # held_back, blocked and the horizon.
    items: dict[str, list[Claimed]] = {r.subscriber: [] for r in requests}
    seen: dict[str, Any] = {}
    for row in rows:
        seen[row["wanted"]] = row
        if row["subscriber"] is not None:
            items[row["subscriber"]].append(Claimed(*row[:-4]))
    return {
        name: Claim(claimed, bool(row["held_back"]), bool(row["blocked"]), str(row["horizon"]))
        for name, claimed in items.items()
        for row in (seen[name],)
    }


async def claim(
    conn: AsyncConnection,
    subscriber: str,
    *,
    limit: int,
    lease_seconds: float,
    precedence: bool = True,
) -> list[Claimed]:
    """The deliveries :func:`claim_batches` claims for one subscriber."""
    request = ClaimRequest(subscriber, limit, precedence)
    return (await claim_batches(conn, [request], lease_seconds=lease_seconds))[subscriber].items


# Renewal skips a row locked right now: its ack, retry or release is committing, and the claim
# ends with it; waiting for the lock would stall every other renewal behind one handler. A
# handed-off delivery (position 0) is found by its event.
_RENEW = """
    WITH wanted AS (
        SELECT CASE WHEN w.position = 0
                    THEN (SELECT e.position FROM vms.events e WHERE e.id = w.event)
                    ELSE w.position END AS position,
               w.claim, w.secs
          FROM unnest($2::bigint[], $3::uuid[], $4::float8[], $5::uuid[]) AS w(position, claim, secs, event)
    ),
    live AS (
        SELECT d.position, w.secs
          FROM vms.deliveries d JOIN wanted w ON d.position = w.position AND d.claim = w.claim
         WHERE d.subscriber = $1
           FOR UPDATE OF d SKIP LOCKED
    )
    UPDATE vms.deliveries d
       SET claimed_until = now() + make_interval(secs => l.secs)
      FROM live l
     WHERE d.subscriber = $1 AND d.position = l.position
"""


async def renew(conn: AsyncConnection, subscriber: str, claims: Sequence[tuple[Claimed, float]]) -> None:
    """Extend each claim of ``claims`` to ``seconds`` from now, in one statement: the heartbeat
    of a live worker. A claim already run out and taken over by another is left alone."""
    if not claims:
        return
    await (await driver(conn)).execute(
        _RENEW,
        subscriber,
        [item.position for item, _ in claims],
        [item.claim for item, _ in claims],
        [float(seconds) for _, seconds in claims],
        [item.event_id for item, _ in claims],
    )


_POSITIONS = "SELECT id, position FROM vms.events WHERE id = ANY($1::uuid[])"


async def resolve(conn: AsyncConnection, items: Sequence[Claimed]) -> list[Claimed]:
    """``items`` with the position of each handed-off one filled in (one statement, only when
    there is one): what retrying, releasing or dead-lettering it needs. A delivery
    whose event is gone keeps position 0, which matches no delivery."""
    missing = [i.event_id for i in items if i.handed_off]
    if not missing:
        return list(items)
    found = {r["id"]: r["position"] for r in await (await driver(conn)).fetch(_POSITIONS, missing)}
    return [
        replace(i, position=found.get(i.event_id, HANDED_OFF_POSITION)) if i.handed_off else i for i in items
    ]


class ClaimLost(CoreError):
    """The claim ran out and another worker took the delivery over; this attempt must roll back."""


@dataclass(frozen=True, slots=True)
class Ack:
    """Marks ``item`` handled: ``vms.ack``, sent in the handler transaction's COMMIT message.

    It runs under the subscriber's role and deletes the delivery by its claim token, so the
    handler's effects and the "handled" mark commit together (G4), at no extra round trip. When
    the claim ran out and another worker took the delivery over, ``vms.ack`` raises, the
    COMMIT does not run, and this attempt rolls back as ``ClaimLost``. The values are inlined
    (the message uses the simple-query protocol): the subscriber is a validated service name,
    quoted anyway; the position an integer; the claim a UUID.
    """

    item: Claimed

    @property
    def sql(self) -> str:
        item = self.item
        if item.handed_off:
            return (
                f"SELECT vms.ack_event({quote_literal(item.subscriber)}, '{uuid.UUID(str(item.event_id))}', "
                f"'{uuid.UUID(str(item.claim))}')"
            )
        return (
            f"SELECT vms.ack({quote_literal(item.subscriber)}, {int(item.position)}, "
            f"'{uuid.UUID(str(item.claim))}')"
        )

    def translate(self, err: BaseException) -> BaseException | None:
        if sqlstate_of(err) != CLAIM_LOST_SQLSTATE:
            return None
        return ClaimLost(
            f"delivery of event {self.item.event_id} to {self.item.subscriber!r} was claimed "
            "by another worker after this one's claim ran out"
        )


@dataclass(frozen=True, slots=True)
class GroupAck:
    """Marks every delivery of ``items`` (one subscriber's) handled, in one statement sent with
    the COMMIT of the transaction that handled them all (``@Inbound(group_commit=)``): each
    ``vms.ack`` raises when its claim was lost, and then none of them commits."""

    items: Sequence[Claimed]

    @property
    def sql(self) -> str:
        if any(i.handed_off for i in self.items):  # by event: one of them has no position
            rows = ", ".join(
                f"({quote_literal(i.subscriber)}, '{uuid.UUID(str(i.event_id))}'::uuid, "
                f"'{uuid.UUID(str(i.claim))}'::uuid)"
                for i in self.items
            )
            return (
                "SELECT vms.ack_event(a.subscriber, a.event, a.claim) "
                f"FROM (VALUES {rows}) AS a(subscriber, event, claim)"
            )
        rows = ", ".join(
            f"({quote_literal(i.subscriber)}, {int(i.position)}::bigint, '{uuid.UUID(str(i.claim))}'::uuid)"
            for i in self.items
        )
        return (
            "SELECT vms.ack(a.subscriber, a.position, a.claim) "
            f"FROM (VALUES {rows}) AS a(subscriber, position, claim)"
        )

    def translate(self, err: BaseException) -> BaseException | None:
        if sqlstate_of(err) != CLAIM_LOST_SQLSTATE:
            return None
        return ClaimLost(f"a delivery of a group of {len(self.items)} was claimed by another worker: {err}")


_RETRY = text(
    """
    UPDATE vms.deliveries
       SET claim = NULL, claimed_until = NULL, last_error = :error,
           available_at = now() + make_interval(secs => :delay)
     WHERE subscriber = :subscriber AND position = :position AND claim = :claim
    """
)


async def retry_later(conn: AsyncConnection, item: Claimed, error: str, delay: float) -> None:
    (item,) = await resolve(conn, [item])
    await conn.execute(
        _RETRY,
        {
            "subscriber": item.subscriber,
            "position": item.position,
            "claim": item.claim,
            "error": error,
            "delay": delay,
        },
    )


_RELEASE = text(
    "UPDATE vms.deliveries SET claim = NULL, claimed_until = NULL, attempts = attempts - 1 "
    "WHERE subscriber = :subscriber AND position = :position AND claim = :claim"
)


async def release(conn: AsyncConnection, item: Claimed) -> None:
    """Give a claimed delivery back untried (worker shutting down)."""
    (item,) = await resolve(conn, [item])
    await conn.execute(
        _RELEASE, {"subscriber": item.subscriber, "position": item.position, "claim": item.claim}
    )


_DEAD_LETTER = """
    WITH gone AS (
        {remove}
        RETURNING subscriber, position, xid, event_type, key, attempts
    )
    INSERT INTO vms.dead_letters
           (subscriber, position, xid, event_id, event_type, key, payload, error, traceback,
            attempts, blocking)
    SELECT g.subscriber, g.position, g.xid, ev.id, g.event_type, g.key, ev.payload, :error,
           :traceback, g.attempts, :blocking
      FROM gone g JOIN vms.events ev ON ev.position = g.position
    RETURNING id
"""
_MATCH = "WHERE subscriber = :subscriber AND position = :position AND claim = :claim"
# Non-blocking: the delivery goes, and later events of its key flow on.
_DEAD_LETTER_FLOWING = text(_DEAD_LETTER.format(remove=f"DELETE FROM vms.deliveries {_MATCH}"))
# Blocking: the delivery stays, parked for ever, so its key waits for a replay or a discard.
_DEAD_LETTER_BLOCKING = text(
    _DEAD_LETTER.format(
        remove="UPDATE vms.deliveries SET claim = NULL, claimed_until = NULL, "
        f"available_at = 'infinity', last_error = :error {_MATCH}"
    )
)


async def dead_letter(
    conn: AsyncConnection, item: Claimed, error: str, traceback: str | None, *, blocking: bool = False
) -> int | None:
    """Move ``item`` to the dead letters; ``blocking`` keeps its key waiting until a replay."""
    (item,) = await resolve(conn, [item])
    row = (
        await conn.execute(
            _DEAD_LETTER_BLOCKING if blocking else _DEAD_LETTER_FLOWING,
            {
                "subscriber": item.subscriber,
                "position": item.position,
                "claim": item.claim,
                "error": error,
                "traceback": traceback,
                "blocking": blocking,
            },
        )
    ).first()
    return None if row is None else int(row.id)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery a handler gave up on: which event, which subscriber, how often tried, and why."""

    id: int
    subscriber: str
    event_type: str
    key: str | None
    attempts: int
    error: str
    failed_at: datetime
    #: When it was replayed or discarded; ``None`` while it waits for a person.
    replayed_at: datetime | None


_DEAD_LETTER_COLUMNS = (
    dead_letters.c.id,
    dead_letters.c.subscriber,
    dead_letters.c.event_type,
    dead_letters.c.key,
    dead_letters.c.attempts,
    dead_letters.c.error,
    dead_letters.c.failed_at,
    dead_letters.c.replayed_at,
)


async def list_dead_letters(
    conn: AsyncConnection, *, subscriber: str | None = None, include_replayed: bool = False
) -> list[DeadLetter]:
    """Dead letters in the order they failed; only ``subscriber``'s, and replayed ones, if asked."""
    query = select(*_DEAD_LETTER_COLUMNS).order_by(dead_letters.c.id)
    if subscriber is not None:
        query = query.where(dead_letters.c.subscriber == subscriber)
    if not include_replayed:
        query = query.where(dead_letters.c.replayed_at.is_(None))
    return [DeadLetter(*row) for row in await conn.execute(query)]


# Wakes the subscriber's workers; the payload is "<subscribers>" (see eventlog's fan-out).
_NOTIFY = text("SELECT pg_notify(:channel, :subscriber)")


async def _wake(conn: AsyncConnection, subscriber: str) -> None:
    await conn.execute(_NOTIFY, {"channel": NOTIFY_CHANNEL, "subscriber": subscriber})


_REPLAY = text(
    """
    WITH letter AS (
        UPDATE vms.dead_letters SET replayed_at = now()
         WHERE id = :id AND replayed_at IS NULL AND position IS NOT NULL
        RETURNING subscriber, position, xid, event_type, key
    )
    INSERT INTO vms.deliveries (subscriber, position, xid, event_type, key)
    SELECT l.subscriber, l.position, l.xid, l.event_type, l.key
      FROM letter l JOIN vms.events ev ON ev.position = l.position
    -- A blocking letter's delivery is still there, parked: wake it up with a fresh budget.
    ON CONFLICT (subscriber, position) DO UPDATE
       SET available_at = now(), attempts = 0, claim = NULL, claimed_until = NULL
    RETURNING subscriber
    """
)


async def replay(conn: AsyncConnection, dead_letter_id: int) -> bool:
    """Deliver a dead-lettered event again; ``False`` if unknown, replayed, or its event is gone."""
    row = (await conn.execute(_REPLAY, {"id": dead_letter_id})).first()
    if row is not None:
        await _wake(conn, row.subscriber)
    return row is not None


_DISCARD = text(
    """
    WITH letter AS (
        UPDATE vms.dead_letters SET replayed_at = now(), error = error || ' (discarded)'
         WHERE id = :id AND replayed_at IS NULL
        RETURNING subscriber, position, blocking
    )
    DELETE FROM vms.deliveries d USING letter l
     WHERE l.blocking AND d.subscriber = l.subscriber AND d.position = l.position
    RETURNING d.subscriber
    """
)


async def discard(conn: AsyncConnection, dead_letter_id: int) -> bool:
    """Give up on a blocking dead letter for good: its key flows on without it."""
    row = (await conn.execute(_DISCARD, {"id": dead_letter_id})).first()
    if row is not None:
        await _wake(conn, row.subscriber)
    return row is not None


# Parked deliveries (blocking dead letters) wait for a person, not for the workers.
_PENDING = text(
    "SELECT count(*) FROM vms.deliveries "
    "WHERE subscriber = ANY(CAST(:s AS text[])) AND available_at < 'infinity'"
)
# Due, unclaimed, committed, and above the snapshot horizon: waiting for an older transaction.
_HELD_BACK = """
    SELECT EXISTS (
        SELECT 1 FROM vms.deliveries
         WHERE subscriber = $1 AND available_at <= now()
           AND (claim IS NULL OR claimed_until < now())
           AND xid >= pg_snapshot_xmin(pg_current_snapshot()))
"""


async def held_back(conn: AsyncConnection, subscriber: str) -> bool:
    """Whether deliveries of ``subscriber`` wait only for the horizon (an older transaction)."""
    return bool(await (await driver(conn)).fetchval(_HELD_BACK, subscriber))


async def pending_count(conn: AsyncConnection, subscribers: list[str]) -> int:
    return int((await conn.execute(_PENDING, {"s": subscribers})).scalar_one())
