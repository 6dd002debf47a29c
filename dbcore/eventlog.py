"""The event log: the transactional outbox every service writes, and the fan-out to subscribers.

A service's transaction inserts its events into ``vms.events`` together with its state changes,
so both commit or neither does (G2). A statement trigger fans each new event out into one
``vms.deliveries`` row per subscribing service (from ``vms.subscriptions``) in the same
transaction, and NOTIFYs the subscribers; the notification is sent by Postgres at commit only.

Ordering is by ``(xid, position)``, never by ``position`` alone: a sequence value is taken when
the row is inserted, not when its transaction commits, so position 7 may become visible before
position 5. Readers only consider rows whose transaction id is below the xmin of their snapshot
(every transaction with a smaller id has finished), so a row that is not visible yet always sorts
after everything already read; see ``delivery.py`` and the relay.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import UserDefinedType

from dbcore.catalog import SERVICE_ROLE_FUNCTION, SERVICES_GROUP_ROLE, metadata
from dbcore.notifications import NOTIFY_LIST_LIMIT, NOTIFY_PART_FUNCTION

__all__ = [
    "ACK_EVENT_FUNCTION",
    "FAN_OUT_FUNCTION",
    "HANDED_OFF_SQLSTATE",
    "HANDOFF_SECONDS",
    "INSERT_EVENTS",
    "NOTIFY_CHANNEL",
    "OWN_EVENTS_POLICY",
    "UNDECLARED_FUNCTION",
    "EventRecord",
    "Outcome",
    "append",
    "dead_letters",
    "deliveries",
    "events",
    "find_outcome",
    "find_outcomes",
    "install_sql",
    "prune",
    "relay_cursors",
]

NOTIFY_CHANNEL = "vms_events"


class Xid8(UserDefinedType[int]):
    """Postgres ``xid8``: a 64-bit transaction id that never wraps around."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


events = Table(
    "events",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=True),
    Column("xid", Xid8, nullable=False, server_default=text("pg_current_xact_id()")),
    Column("id", UUID(as_uuid=True), nullable=False, unique=True),
    Column("type", String(200), nullable=False),
    Column("key", Text),
    Column("payload", JSONB, nullable=False),
    Column("producer", String(40)),
    Column("correlation_id", Text),
    Column("causation_id", UUID(as_uuid=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Where an event came from when it did not start in this core (e.g. "kafka:<topic>"):
    # the relay publishes only events that started here, so nothing loops back.
    Column("origin", Text),
    # The sender's W3C traceparent when tracing was on: a handler's span is a child of it.
    Column("trace_context", Text),
    # A hand-off (see FAN_OUT_FUNCTION): the subscribers, comma-separated, whose deliveries of
    # this event are inserted claimed with this token.
    Column("handoff_to", Text),
    Column("handoff_claim", UUID(as_uuid=True)),
    Index("ix_events_xid_position", "xid", "position"),
    Index(
        "ix_events_correlation_id",
        "correlation_id",
        postgresql_where=text("correlation_id IS NOT NULL"),
    ),
)

DELIVERIES_FILLFACTOR = 50

# One row per (subscriber, event) still to be handled. The row is deleted in the handler's own
# transaction, so "handled" and the handler's effects commit together (G4).
deliveries = Table(
    "deliveries",
    metadata,
    Column("subscriber", String(40), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("xid", Xid8, nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("key", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("available_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("claim", UUID(as_uuid=True)),
    Column("claimed_until", DateTime(timezone=True)),
    Column("last_error", Text),
    PrimaryKeyConstraint("subscriber", "position"),
    Index("ix_deliveries_order", "subscriber", "xid", "position"),
    Index("ix_deliveries_key", "subscriber", "key", "xid", "position"),
    Index("ix_deliveries_type", "subscriber", "event_type", "xid", "position"),
    # Each row is claimed (updated) once before it is deleted: free space in every page lets the
    # claim be a HOT update, which writes no index entries.
    postgresql_with={"fillfactor": DELIVERIES_FILLFACTOR},
)

# How far each relay has published the log, as the (xid, position) of the last event sent.
relay_cursors = Table(
    "relay_cursors",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("xid", Xid8, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("subscriber", String(40), nullable=False),
    Column("position", BigInteger),
    Column("xid", Xid8),
    Column("event_id", UUID(as_uuid=True)),
    Column("event_type", String(200), nullable=False),
    Column("key", Text),
    Column("payload", JSONB),
    Column("raw", Text, comment="undecodable input as received, when there is no payload"),
    Column("source", String(200), nullable=False, server_default="db"),
    Column("error", Text, nullable=False),
    Column("traceback", Text),
    Column("attempts", Integer, nullable=False),
    # A blocking dead letter keeps its delivery parked, holding back later events of its key.
    Column("blocking", Boolean, nullable=False, server_default="false"),
    Column("failed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("replayed_at", DateTime(timezone=True)),
)

_GROUP = SERVICES_GROUP_ROLE

#: SQLSTATE of ``vms.ack``'s refusal (a class Postgres does not use).
CLAIM_LOST_SQLSTATE = "VMS01"
#: SQLSTATE of the fan-out's NOTICE that it handed deliveries off (its detail: how many).
HANDED_OFF_SQLSTATE = "VMS02"
#: How long a handed-off delivery's claim lasts until the App's heartbeat renews it (the
#: dispatcher's liveness, ``framework._internal.dispatcher._LIVENESS``).
HANDOFF_SECONDS = 2.0

# Marks a delivery handled, in the handler's transaction, under the subscriber's role (SECURITY
# INVOKER: row-level security lets a service delete only its own deliveries). It raises, rather
# than reporting zero rows, so that it can travel in the COMMIT's message: the error stops the
# COMMIT and the handler's transaction rolls back.
ACK_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION vms.ack(p_subscriber text, p_position bigint, p_claim uuid)
    RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, vms AS $$
    BEGIN
        DELETE FROM vms.deliveries
         WHERE subscriber = p_subscriber AND position = p_position AND claim = p_claim;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'delivery % of % is no longer claimed by this worker',
                            p_position, p_subscriber
                  USING ERRCODE = '{CLAIM_LOST_SQLSTATE}';
        END IF;
    END $$
"""

# A service inserts events only in its own name, and only of the types its descriptor declares
# with @Outbound (G1): vms.outbound, filled at registration. The administrator and the core role
# (publish, Kafka ingress) are not bound by it; the core's SECURITY DEFINER functions (replica
# changes, reference events) run as the administrator.
OWN_EVENTS_POLICY = """
    CREATE POLICY own_events ON vms.events FOR INSERT
    WITH CHECK (producer IS NOT NULL AND vms.service_role(producer) = current_user
                AND EXISTS (SELECT 1 FROM vms.outbound o
                             WHERE o.service = producer AND o.event_type = type))
"""

# A local service's event of a type it did not declare: row-level security keeps a service from
# inserting one, and the fan-out does not deliver one either (defence in depth: an administrator's
# or the core role's insert in a service's name). The core's own types ("vms." ...) come from its
# SECURITY DEFINER functions, and events from outside (origin) from other cores: both pass.
# Without a search_path of its own (every name is qualified) so the planner inlines it.
UNDECLARED_FUNCTION = """
    CREATE OR REPLACE FUNCTION vms.undeclared(p_producer text, p_type text, p_origin text)
    RETURNS boolean LANGUAGE sql STABLE AS $$
        SELECT p_producer IS NOT NULL AND p_origin IS NULL AND p_type NOT LIKE 'vms.%'
           AND EXISTS (SELECT 1 FROM vms.services WHERE name = p_producer)
           AND NOT EXISTS (SELECT 1 FROM vms.outbound WHERE service = p_producer AND event_type = p_type)
    $$
"""

# Fan-out: one delivery per subscriber of each new event, then one NOTIFY per statement
# naming the subscribers. SECURITY DEFINER so a service role, which may only insert into
# vms.events, can still create the deliveries its events cause.
#
# A hand-off: an event whose producer's App runs some of its subscribers itself names them
# (handoff_to) and a claim token (handoff_claim); their deliveries are then inserted already
# claimed, and left out of the NOTIFY, so the App hands them to its own workers once the
# transaction commits, without a notification and a claim round trip
# (framework._internal.handoff). Only when the dispatcher's own claim (delivery.py) would take
# them at once: no older transaction is still open (none can commit an earlier delivery later:
# G3), and none of the subscribers has a delivery of the same key waiting (G5). All or nothing.
# The number claimed is told to the producer by a NOTICE (HANDED_OFF_SQLSTATE, the number as
# its detail), which reaches it in the reply to its COMMIT message (dbcore.outbox). The first
# delivery of a key in the statement is claimed, later ones of the same key wait behind it, as
# they would. The claim lasts HANDOFF_SECONDS; the App's heartbeat renews it like any other.
FAN_OUT_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION vms.fan_out() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, vms AS $$
    DECLARE
        targets text;
        correlations text;
        handing boolean := false;
        handed integer;
    BEGIN
        IF EXISTS (SELECT 1 FROM new_events WHERE handoff_claim IS NOT NULL) THEN
            handing := pg_snapshot_xmin(pg_current_snapshot()) = pg_current_xact_id()
                AND NOT EXISTS (
                    SELECT 1 FROM new_events n
                      JOIN vms.deliveries e
                        ON e.subscriber = ANY(string_to_array(n.handoff_to, ',')) AND e.key = n.key
                     WHERE n.handoff_claim IS NOT NULL);
        END IF;
        WITH fanned AS (
            SELECT s.service, n.position, n.xid, n.type, n.key, n.handoff_claim,
                   handing AND n.handoff_claim IS NOT NULL
                       AND s.service = ANY(string_to_array(n.handoff_to, ',')) AS handed_to
              FROM new_events n JOIN vms.subscriptions s ON s.event_type = n.type
             WHERE NOT vms.undeclared(n.producer, n.type, n.origin)
        ),
        ranked AS (
            SELECT f.*, f.handed_to AND (f.key IS NULL OR row_number() OVER (
                       PARTITION BY f.service, f.key ORDER BY f.position) = 1) AS claimed
              FROM fanned f
        ),
        inserted AS (
            INSERT INTO vms.deliveries
                   (subscriber, position, xid, event_type, key, attempts, claim, claimed_until)
            SELECT r.service, r.position, r.xid, r.type, r.key,
                   CASE WHEN r.claimed THEN 1 ELSE 0 END,
                   CASE WHEN r.claimed THEN r.handoff_claim END,
                   CASE WHEN r.claimed THEN now() + make_interval(secs => {HANDOFF_SECONDS}) END
              FROM ranked r
        )
        SELECT string_agg(DISTINCT service, ',') FILTER (WHERE NOT handed_to),
               count(*) FILTER (WHERE claimed)
          INTO targets, handed
          FROM ranked;
        IF handed > 0 THEN
            RAISE NOTICE 'vms: % deliveries handed off', handed
                  USING ERRCODE = '{HANDED_OFF_SQLSTATE}', DETAIL = handed::text;
        END IF;
        -- The second line names each correlation with the event types it committed (the
        -- format: dbcore.notifications), so an outcome waiter is looked up only when a type it
        -- awaits committed; '*' (look at all) when the list would not fit in a notification.
        SELECT string_agg(vms.notify_part(c.correlation_id) || '=' || c.types, ',') INTO correlations
          FROM (SELECT correlation_id, string_agg(DISTINCT vms.notify_part(type), '|') AS types
                  FROM new_events WHERE correlation_id IS NOT NULL GROUP BY correlation_id) c;
        IF octet_length(coalesce(targets, '')) + octet_length(correlations) > {NOTIFY_LIST_LIMIT} THEN
            correlations := '*';
        END IF;
        IF targets IS NOT NULL OR correlations IS NOT NULL THEN
            PERFORM pg_notify('{NOTIFY_CHANNEL}',
                              coalesce(targets, '') || E'\\n' || coalesce(correlations, ''));
        END IF;
        RETURN NULL;
    END $$
    """

# Marks a handed-off delivery handled: vms.ack by the event's id, as the App that handed it off
# does not know the delivery's position. SECURITY DEFINER, as service roles cannot read the log;
# it checks what row-level security checks for vms.ack: the caller is the subscriber's login (or
# may act as it).
ACK_EVENT_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION vms.ack_event(p_subscriber text, p_event uuid, p_claim uuid)
    RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, vms AS $$
    BEGIN
        IF NOT pg_has_role(session_user, vms.service_role(p_subscriber), 'MEMBER') THEN
            RAISE EXCEPTION 'permission denied to acknowledge deliveries to %', p_subscriber
                  USING ERRCODE = '42501';
        END IF;
        DELETE FROM vms.deliveries d USING vms.events e
         WHERE e.id = p_event AND d.subscriber = p_subscriber AND d.position = e.position
           AND d.claim = p_claim;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'delivery of event % to % is no longer claimed by this worker',
                            p_event, p_subscriber
                  USING ERRCODE = '{CLAIM_LOST_SQLSTATE}';
        END IF;
    END $$
"""

#: DDL that SQLAlchemy's create_all does not express: fan-out trigger, row-level security.
install_sql: Sequence[str] = (
    SERVICE_ROLE_FUNCTION,
    f"GRANT EXECUTE ON FUNCTION vms.service_role(text) TO {_GROUP}",
    # A log created before the column existed (create_all adds no column to a table it finds).
    "ALTER TABLE vms.events ADD COLUMN IF NOT EXISTS trace_context text",
    UNDECLARED_FUNCTION,
    NOTIFY_PART_FUNCTION,
    FAN_OUT_FUNCTION,
    "DROP TRIGGER IF EXISTS events_fan_out ON vms.events",
    """
    CREATE TRIGGER events_fan_out AFTER INSERT ON vms.events
    REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION vms.fan_out()
    """,
    # Services write the outbox under their own role; row-level security makes sure a service
    # can only insert events in its own name, and only see and delete its own deliveries.
    f"GRANT USAGE ON SCHEMA vms TO {_GROUP}",
    f"GRANT INSERT ON vms.events TO {_GROUP}",
    f"GRANT USAGE ON SEQUENCE vms.events_position_seq TO {_GROUP}",
    "ALTER TABLE vms.events ENABLE ROW LEVEL SECURITY",
    "DROP POLICY IF EXISTS own_events ON vms.events",
    OWN_EVENTS_POLICY,
    # The policy reads the declared types under the service's role: they may see them all.
    f"GRANT SELECT ON vms.outbound TO {_GROUP}",
    f"GRANT SELECT, DELETE ON vms.deliveries TO {_GROUP}",
    "ALTER TABLE vms.deliveries ENABLE ROW LEVEL SECURITY",
    "DROP POLICY IF EXISTS own_deliveries ON vms.deliveries",
    """
    CREATE POLICY own_deliveries ON vms.deliveries FOR ALL
    USING (vms.service_role(subscriber) = current_user)
    """,
    ACK_FUNCTION,
    ACK_EVENT_FUNCTION,
    "REVOKE ALL ON FUNCTION vms.ack_event(text, uuid, uuid) FROM PUBLIC",
    f"GRANT EXECUTE ON FUNCTION vms.ack_event(text, uuid, uuid) TO {_GROUP}",
)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event as the log stores it."""

    id: uuid.UUID
    type: str
    key: str | None
    payload: str  # JSON text, encoded once by the producer
    producer: str | None
    correlation_id: str | None = None
    causation_id: uuid.UUID | None = None
    origin: str | None = None
    trace_context: str | None = None
    #: A hand-off (``FAN_OUT_FUNCTION``): the subscribers, comma-separated, whose deliveries
    #: are inserted claimed with ``handoff_claim``.
    handoff_to: str | None = None
    handoff_claim: uuid.UUID | None = None


# One statement for a whole outbox, so the fan-out trigger fires once per transaction. Sent on
# the asyncpg connection itself (prepared once per connection): it is on every producer's path;
# a transaction's outbox is this statement prepared by name (``dbcore.outbox``).
INSERT_EVENTS = """
    INSERT INTO vms.events (id, type, key, payload, producer, correlation_id, causation_id, origin,
                            trace_context, handoff_to, handoff_claim)
    SELECT id, type, key, payload::jsonb, producer, correlation_id, causation_id, origin, trace_context,
           handoff_to, handoff_claim
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::uuid[], $8::text[], $9::text[], $10::text[], $11::uuid[])
           AS t(id, type, key, payload, producer, correlation_id, causation_id, origin, trace_context,
                handoff_to, handoff_claim)
"""
# Events from outside (publish, Kafka ingress) may arrive twice: the id makes the second a no-op.
# Only the administrator uses it: ON CONFLICT needs to read the table, which service roles cannot.
_INSERT_ONCE = INSERT_EVENTS + " ON CONFLICT (id) DO NOTHING RETURNING id"


async def append(
    conn: AsyncConnection, records: Sequence[EventRecord], *, deduplicate: bool = False
) -> list[uuid.UUID]:
    """Insert ``records`` in ``conn``'s transaction; return the ids of those inserted.

    ``deduplicate``: ignore an event whose id is already in the log (administrator only); the
    ids returned are then those that were new.
    """
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    columns = (
        [r.id for r in records],
        [r.type for r in records],
        [r.key for r in records],
        [r.payload for r in records],
        [r.producer for r in records],
        [r.correlation_id for r in records],
        [r.causation_id for r in records],
        [r.origin for r in records],
        [r.trace_context for r in records],
        [r.handoff_to for r in records],
        [r.handoff_claim for r in records],
    )
    if deduplicate:
        return [row[0] for row in await raw.fetch(_INSERT_ONCE, *columns)]
    await raw.execute(INSERT_EVENTS, *columns)
    return [r.id for r in records]


# Keep what is still needed: pending deliveries, dead letters that may be replayed, and events a
# relay has not published yet.
_PRUNE = text(
    """
    DELETE FROM vms.events e
     WHERE e.created_at < now() - make_interval(secs => :seconds)
       AND NOT EXISTS (SELECT 1 FROM vms.deliveries d WHERE d.position = e.position)
       AND NOT EXISTS (SELECT 1 FROM vms.dead_letters l
                        WHERE l.position = e.position AND l.replayed_at IS NULL)
       AND NOT EXISTS (SELECT 1 FROM vms.relay_cursors c
                        WHERE (e.xid, e.position) > (c.xid, c.position))
    """
)


async def prune(conn: AsyncConnection, older_than_seconds: float) -> int:
    """Delete handled events older than ``older_than_seconds``; return how many."""
    result = await conn.execute(_PRUNE, {"seconds": older_than_seconds})
    return int(result.rowcount)


@dataclass(frozen=True, slots=True)
class Outcome:
    """An event found for a correlation: its type and its payload as JSON text."""

    type: str
    payload: str


# For each (correlation, type) asked for, the first such event in log order, (xid, position): the
# one every reader of the log sees first. One statement for every waiting correlation (through
# ix_events_correlation_id), sent on the driver: no SQLAlchemy compilation per lookup.
_FIND_OUTCOMES = """
    SELECT DISTINCT ON (e.correlation_id, e.type)
           e.correlation_id, e.type, e.payload::text AS payload, e.xid::text::bigint AS xid, e.position
      FROM unnest($1::text[], $2::text[]) AS w(correlation_id, type)
      JOIN vms.events e ON e.correlation_id = w.correlation_id AND e.type = w.type
     ORDER BY e.correlation_id, e.type, e.xid, e.position
"""


async def find_outcomes(
    conn: AsyncConnection, wanted: Mapping[str, Collection[str]]
) -> dict[str, list[Outcome]]:
    """For each correlation of ``wanted``, its events of the types asked for, in one statement.

    ``wanted`` maps a correlation id to the event types that end it. Each correlation found gets
    the first event of each of its types, all in log order (the first is the outcome every reader
    sees first); a correlation with none of them in the log is absent. Meant for an autocommit
    connection: it is one read, and needs no transaction of its own.
    """
    pairs = [(c, t) for c, types in wanted.items() for t in types]
    if not pairs:
        return {}
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    rows = await raw.fetch(_FIND_OUTCOMES, [c for c, _ in pairs], [t for _, t in pairs])
    found: dict[str, list[Outcome]] = {}
    for row in sorted(rows, key=lambda r: (r["xid"], r["position"])):
        found.setdefault(row["correlation_id"], []).append(Outcome(row["type"], row["payload"]))
    return found


async def find_outcome(conn: AsyncConnection, correlation_id: str, types: Sequence[str]) -> Outcome | None:
    """The first event of one of ``types`` in correlation ``correlation_id``, or ``None``."""
    found = (await find_outcomes(conn, {correlation_id: types})).get(correlation_id)
    return found[0] if found else None
