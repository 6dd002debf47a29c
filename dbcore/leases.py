"""Leases pushed down to the core: expiring reservations on a numeric column of one row.

For each ``@Lease`` of a service, registration creates two functions in the owner's schema,
owned by the owner's role and ``SECURITY DEFINER``: callers execute them inside their own
transaction, but they act with the owner's authority, so a caller never gets write access to the
owner's table, and the caller's changes and the lease commit or roll back together.

- ``lease__<fn>(key jsonb, qty numeric, period interval, holder text)``: lock the row, compute
  ``available = on hand - active unexpired leases``, and insert a lease when ``qty`` fits;
  otherwise return NULL. Locking the row serializes grants on it, so concurrent callers can
  never get more than is on hand (G7).
- ``lease__<fn>__settle(id uuid, action text, period interval)``: ``consume`` (decrement the row
  and end the lease), ``release`` or ``renew``; idempotent. A refusal (expired, released,
  consumed, unknown) is returned as ``{"error": ...}`` rather than raised, so it does not abort
  the caller's transaction.

Python reaches them through :func:`grant`, :func:`settle` and :func:`settle_many` only: they
hold the statements, decode the JSON answers, and raise a refusal as ``LeaseExpired``,
``LeaseReleased``, ... (``settle_many`` reports it per lease instead, as a
:class:`LeaseSettlement`).

Expired leases need no process to give their quantity back: a grant only counts leases whose
``expires_at`` lies ahead, and it marks the expired ones it meets as such. ``reap`` deletes ended
leases later to keep the table small. Time comes from ``vms.now()``: the database clock plus an
offset kept in ``vms.clock``, which tests move forward instead of sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal
from uuid import UUID

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Numeric,
    String,
    Table,
    Text,
    TextClause,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import UUID as PgUUID
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import SERVICES_GROUP_ROLE, metadata, quote_ident, quote_literal
from dbcore.descriptor import LeaseDescriptor, ServiceDescriptor, TableDescriptor
from dbcore.errors import (
    LeaseConsumed,
    LeaseError,
    LeaseExpired,
    LeaseNotFound,
    LeaseReleased,
    RegistrationError,
)
from dbcore.lease_language import parse_lease

__all__ = [
    "ActiveLease",
    "Grant",
    "LeaseSettlement",
    "SettleAction",
    "active",
    "advance_clock",
    "grant",
    "install_lease_functions",
    "install_sql",
    "leases",
    "reap",
    "settle",
    "settle_many",
]

leases = Table(
    "leases",
    metadata,
    Column("id", PgUUID(as_uuid=True), primary_key=True),
    Column("service", String(40), nullable=False),
    Column("function", String(200), nullable=False),
    Column("entity", String(63), nullable=False),
    Column("key", JSONB, nullable=False),
    Column("key_text", Text, nullable=False),
    Column("quantity", Numeric, nullable=False),
    Column("holder", String(40)),
    Column("status", String(10), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Index(
        "ix_leases_active",
        "service",
        "entity",
        "key_text",
        postgresql_where=text("status = 'active'"),
    ),
)

_GROUP = SERVICES_GROUP_ROLE

install_sql: Sequence[str] = (
    "CREATE TABLE IF NOT EXISTS vms.clock (id boolean PRIMARY KEY DEFAULT true CHECK (id), "
    "offset_by interval NOT NULL DEFAULT '0')",
    "INSERT INTO vms.clock (id) VALUES (true) ON CONFLICT DO NOTHING",
    """
    CREATE OR REPLACE FUNCTION vms.now() RETURNS timestamptz
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
        SELECT now() + coalesce((SELECT offset_by FROM vms.clock), interval '0')
    $$
    """,
    f"GRANT EXECUTE ON FUNCTION vms.now() TO {_GROUP}",
    # Leases are visible to every service (they are the catalog's record of promises); only the
    # owner's functions, running as the owner, may create or change them.
    "CREATE TABLE IF NOT EXISTS vms.lease_keys (service varchar(40) NOT NULL, "
    "entity varchar(63) NOT NULL, key_text text NOT NULL, grants bigint NOT NULL, "
    "PRIMARY KEY (service, entity, key_text))",
    f"GRANT SELECT, INSERT, UPDATE ON vms.lease_keys TO {_GROUP}",
    "ALTER TABLE vms.lease_keys ENABLE ROW LEVEL SECURITY",
    "DROP POLICY IF EXISTS lease_keys_owner ON vms.lease_keys",
    "CREATE POLICY lease_keys_owner ON vms.lease_keys "
    "FOR ALL USING (vms.service_role(service) = current_user)",
    f"GRANT SELECT, INSERT, UPDATE ON vms.leases TO {_GROUP}",
    "ALTER TABLE vms.leases ENABLE ROW LEVEL SECURITY",
    "DROP POLICY IF EXISTS leases_read ON vms.leases",
    "CREATE POLICY leases_read ON vms.leases FOR SELECT USING (true)",
    "DROP POLICY IF EXISTS leases_insert ON vms.leases",
    "CREATE POLICY leases_insert ON vms.leases "
    "FOR INSERT WITH CHECK (vms.service_role(service) = current_user)",
    "DROP POLICY IF EXISTS leases_update ON vms.leases",
    "CREATE POLICY leases_update ON vms.leases FOR UPDATE USING (vms.service_role(service) = current_user)",
)


def _grant_function(service: str, function: str) -> str:
    return f"{quote_ident(service)}.{quote_ident(f'lease__{function}')}"


def _settle_function(service: str, function: str) -> str:
    return f"{quote_ident(service)}.{quote_ident(f'lease__{function}__settle')}"


def _definitions(descriptor: ServiceDescriptor, lease: LeaseDescriptor) -> list[str]:
    spec = parse_lease(lease.text)
    table: TableDescriptor | None = descriptor.entity(spec.entity) or descriptor.table(spec.entity)
    if table is None:  # the framework checked this at start-up; a hand-written descriptor may not
        raise RegistrationError(
            f"lease {lease.function}: {spec.entity!r} is not a table of {descriptor.name}"
        )
    svc, fn = descriptor.name, lease.function
    qualified = f"{quote_ident(svc)}.{quote_ident(table.name)}"
    column = quote_ident(spec.column)
    key_columns = [quote_ident(c) for c, _ in spec.keys]
    match_key = " AND ".join(f"t.{c} = k.{c}" for c in key_columns)
    key_object = ", ".join(f"{quote_literal(c)}, r.{quote_ident(c)}" for c, _ in spec.keys)
    same_lease = (
        f"service = {quote_literal(svc)} AND entity = {quote_literal(table.name)} AND key_text = key_text_"
    )
    grant = f"""
    CREATE OR REPLACE FUNCTION {_grant_function(svc, fn)}(
        p_key jsonb, p_qty numeric, p_period interval, p_holder text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
    DECLARE
        r {qualified};
        now_ timestamptz := vms.now();
        key_text_ text;
        held numeric;
        lease_id uuid := gen_random_uuid();
    BEGIN
        IF p_qty IS NULL OR p_qty <= 0 THEN
            RAISE EXCEPTION 'lease {svc}.{fn}: quantity must be positive, got %', p_qty
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF p_period IS NULL OR p_period <= interval '0' THEN
            RAISE EXCEPTION 'lease {svc}.{fn}: period must be positive, got %', p_period
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- The row lock serializes every grant and consume on this row: no oversell.
        SELECT t.* INTO r FROM {qualified} t, jsonb_populate_record(NULL::{qualified}, p_key) k
         WHERE {match_key} FOR UPDATE OF t;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        key_text_ := jsonb_build_object({key_object})::text;
        -- Count this grant on the key's counter row. Under snapshot or serializable isolation a
        -- concurrent grant on the same key then fails with a serialization error (and is retried)
        -- instead of counting leases from a snapshot that misses the other's: no oversell there
        -- either. Under read committed the update waits, and the sum below sees the other lease.
        INSERT INTO vms.lease_keys AS lk (service, entity, key_text, grants)
        VALUES ({quote_literal(svc)}, {quote_literal(table.name)}, key_text_, 1)
        ON CONFLICT (service, entity, key_text) DO UPDATE SET grants = lk.grants + 1;
        UPDATE vms.leases SET status = 'expired', ended_at = expires_at
         WHERE {same_lease} AND status = 'active' AND expires_at <= now_;
        SELECT coalesce(sum(quantity), 0) INTO held FROM vms.leases
         WHERE {same_lease} AND status = 'active';
        IF r.{column} - held < p_qty THEN
            RETURN NULL;
        END IF;
        INSERT INTO vms.leases (id, service, function, entity, key, key_text, quantity, holder,
                                status, created_at, expires_at)
        VALUES (lease_id, {quote_literal(svc)}, {quote_literal(fn)}, {quote_literal(table.name)},
                key_text_::jsonb, key_text_, p_qty, p_holder, 'active', now_, now_ + p_period);
        RETURN jsonb_build_object('id', lease_id, 'quantity', p_qty, 'expires_at', now_ + p_period,
                                  'key', key_text_::jsonb, 'row', to_jsonb(r),
                                  'available', r.{column} - held - p_qty);
    END $fn$
    """
    settle = f"""
    CREATE OR REPLACE FUNCTION {_settle_function(svc, fn)}(
        p_id uuid, p_action text, p_period interval) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
    DECLARE
        l vms.leases;
        now_ timestamptz := vms.now();
    BEGIN
        SELECT * INTO l FROM vms.leases
         WHERE id = p_id AND service = {quote_literal(svc)} AND function = {quote_literal(fn)} FOR UPDATE;
        -- A refusal is an answer, not an exception: the caller's transaction stays usable and
        -- settle() raises LeaseExpired, LeaseReleased, ... in Python.
        IF NOT FOUND THEN
            RETURN jsonb_build_object('error', 'not_found', 'id', p_id,
                                      'message', format('lease %s of {svc}.{fn} does not exist', p_id));
        END IF;
        -- Repeating what already happened is a no-op (idempotent).
        IF (p_action = 'consume' AND l.status = 'consumed')
           OR (p_action = 'release' AND l.status IN ('released', 'expired')) THEN
            RETURN to_jsonb(l);
        END IF;
        IF l.status = 'active' AND l.expires_at <= now_ THEN
            IF p_action = 'release' THEN
                UPDATE vms.leases SET status = 'expired', ended_at = l.expires_at WHERE id = p_id;
                RETURN to_jsonb(l) || jsonb_build_object('status', 'expired');
            END IF;
            l.status := 'expired';
        END IF;
        IF l.status = 'expired' THEN
            RETURN jsonb_build_object('error', 'expired', 'id', p_id,
                                      'message', format('lease %s expired at %s', p_id, l.expires_at));
        ELSIF l.status IN ('released', 'consumed') THEN
            RETURN jsonb_build_object('error', l.status, 'id', p_id,
                                      'message', format('lease %s was %s', p_id, l.status));
        END IF;
        IF p_action = 'consume' THEN
            UPDATE {qualified} t SET {column} = t.{column} - l.quantity
              FROM jsonb_populate_record(NULL::{qualified}, l.key) k WHERE {match_key};
            UPDATE vms.leases SET status = 'consumed', ended_at = now_ WHERE id = p_id
            RETURNING * INTO l;
        ELSIF p_action = 'release' THEN
            UPDATE vms.leases SET status = 'released', ended_at = now_ WHERE id = p_id
            RETURNING * INTO l;
        ELSIF p_action = 'renew' THEN
            UPDATE vms.leases SET expires_at = now_ + p_period WHERE id = p_id RETURNING * INTO l;
        ELSE
            RAISE EXCEPTION 'unknown lease action %', p_action USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN to_jsonb(l);
    END $fn$
    """
    role = quote_ident(descriptor.role)
    grants = []
    for name, signature in (
        (_grant_function(svc, fn), "jsonb, numeric, interval, text"),
        (_settle_function(svc, fn), "uuid, text, interval"),
    ):
        grants += [
            f"ALTER FUNCTION {name}({signature}) OWNER TO {role}",
            f"REVOKE ALL ON FUNCTION {name}({signature}) FROM PUBLIC",
            f"GRANT EXECUTE ON FUNCTION {name}({signature}) TO {quote_ident(_GROUP)}",
        ]
    return [grant, settle, *grants]


async def install_lease_functions(conn: AsyncConnection, descriptor: ServiceDescriptor) -> None:
    """Create (or replace) the functions of every lease the descriptor declares.

    The owner's tables may not exist yet (migrations create them after registration), so the
    bodies are not checked now; Postgres resolves the table when a function first runs.
    """
    if descriptor.leases:
        await conn.execute(text("SET LOCAL check_function_bodies = off"))
    for lease in descriptor.leases:
        for statement in _definitions(descriptor, lease):
            await conn.execute(text(statement))


# -- the protocol: granting and settling ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """What a lease function answered when it granted: the lease and the row it holds.

    ``row`` is the leased row as it was at the grant; ``available`` what was left for others
    right after it.
    """

    id: UUID
    key: dict[str, Any]
    quantity: int | float
    expires_at: datetime
    row: dict[str, Any]
    available: int | float


SettleAction = Literal["consume", "release", "renew"]


# One statement text per lease function, built once: the grant is on the request path.
@lru_cache(maxsize=1024)
def _grant_statement(service: str, function: str) -> TextClause:
    return text(f"SELECT {_grant_function(service, function)}(CAST(:key AS jsonb), :qty, :period, :holder)")


@lru_cache(maxsize=1024)
def _settle_statement(service: str, function: str) -> TextClause:
    return text(f"SELECT {_settle_function(service, function)}(CAST(:id AS uuid), :action, :period)")


def _decoded(raw: Any) -> dict[str, Any]:
    # asyncpg hands jsonb over as text unless a codec is set on the connection.
    data: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else raw
    return data


async def grant(
    conn: AsyncConnection,
    service: str,
    function: str,
    key: Mapping[str, Any],
    quantity: int | float,
    period: timedelta,
    holder: str | None,
) -> Grant | None:
    """Run ``service``'s lease function ``function`` in ``conn``'s transaction.

    ``key`` names the leased row by its key columns. Returns ``None`` when the row does not
    exist or fewer than ``quantity`` are available. A non-positive quantity or period is
    refused by Postgres (``invalid_parameter_value``) and raised as the driver's error.
    """
    params = {
        "key": json.dumps(dict(key), default=str),
        "qty": quantity,
        "period": period,
        "holder": holder,
    }
    raw = (await conn.execute(_grant_statement(service, function), params)).scalar_one()
    if raw is None:
        return None
    data = _decoded(raw)
    return Grant(
        id=UUID(str(data["id"])),
        key=data["key"],
        quantity=data["quantity"],
        expires_at=datetime.fromisoformat(data["expires_at"]),
        row=data["row"],
        available=data["available"],
    )


# The settle function's refusals ({"error": ...}) and the exception each one raises.
_REFUSALS: Mapping[str, type[LeaseError]] = {
    "expired": LeaseExpired,
    "released": LeaseReleased,
    "consumed": LeaseConsumed,
    "not_found": LeaseNotFound,
}
_WHICH = text("SELECT service, function FROM vms.leases WHERE id = :id")


async def settle(
    conn: AsyncConnection,
    action: SettleAction,
    lease_id: UUID,
    period: timedelta | None = None,
    *,
    service: str | None = None,
    function: str | None = None,
) -> dict[str, Any]:
    """``consume``, ``release`` or ``renew`` (for ``period`` from now) a lease in ``conn``'s
    transaction; return the lease as it is afterwards. Idempotent.

    ``service`` and ``function`` name the lease function that granted it; without them the
    lease is looked up first. A refusal does not abort the transaction: it raises
    ``LeaseExpired``, ``LeaseReleased``, ``LeaseConsumed`` or ``LeaseNotFound`` and changes
    nothing.
    """
    if service is None or function is None:
        row = (await conn.execute(_WHICH, {"id": lease_id})).first()
        if row is None:
            raise LeaseNotFound(str(lease_id), f"lease {lease_id} does not exist (or was reaped)")
        service, function = row.service, row.function
    params = {"id": lease_id, "action": action, "period": period}
    data = _decoded((await conn.execute(_settle_statement(service, function), params)).scalar_one())
    refusal = _REFUSALS.get(data.get("error", ""))
    if refusal is not None:
        raise refusal(str(lease_id), data["message"])
    return data


@dataclass(frozen=True, slots=True)
class LeaseSettlement:
    """One lease's answer in a batch settle: settled, or refused (and then nothing changed).

    ``lease`` is the lease as it is afterwards (``None`` when refused); ``refusal`` says why
    not: ``"expired"``, ``"released"``, ``"consumed"`` or ``"not_found"``.
    """

    id: UUID
    lease: dict[str, Any] | None
    refusal: str | None = None
    message: str | None = None

    @property
    def settled(self) -> bool:
        return self.refusal is None

    def error(self) -> LeaseError | None:
        """The error ``settle`` raises for this refusal (``LeaseExpired``, ...), or ``None``."""
        if self.refusal is None:
            return None
        return _REFUSALS[self.refusal](str(self.id), self.message or self.refusal)

    def raise_if_refused(self) -> None:
        """Raise :meth:`error`, if the lease was refused."""
        error = self.error()
        if error is not None:
            raise error


# One statement settles every lease of one lease function: the owner's settle function, called
# once a row. Postgres evaluates a SELECT's output list after its ORDER BY (the SELECT reference,
# "output expressions are computed after sorting"), so the leases are settled in the order of
# their rows' keys. Two transactions that consume leases on the same rows then lock those rows
# in the same order: without it, one consuming A then B and another B then A can deadlock.
@lru_cache(maxsize=1024)
def _settle_many_statement(service: str, function: str) -> TextClause:
    return text(
        f"SELECT i.id, {_settle_function(service, function)}(i.id, :action, :period) AS answer "
        "FROM unnest(CAST(:ids AS uuid[])) AS i(id) LEFT JOIN vms.leases l ON l.id = i.id "
        "ORDER BY l.entity, l.key_text, i.id"
    )


_WHICH_MANY = text("SELECT id, service, function FROM vms.leases WHERE id = ANY(CAST(:ids AS uuid[]))")


async def settle_many(
    conn: AsyncConnection,
    action: SettleAction,
    lease_ids: Sequence[UUID],
    period: timedelta | None = None,
    *,
    service: str | None = None,
    function: str | None = None,
) -> list[LeaseSettlement]:
    """``consume``, ``release`` or ``renew`` many leases in ``conn``'s transaction; one
    :class:`LeaseSettlement` per id, in the order given. Idempotent, like :func:`settle`.

    Nothing is raised for a refused lease and the transaction stays usable: a refusal is an
    answer of the settle function, not an error, so no savepoint is needed around it.
    ``service`` and ``function`` name the lease function that granted every one of them: the
    leases then cost one statement, however many. Without them, one more statement looks up the
    lease function of all of them, and the leases of each function found cost one statement.
    """
    distinct = list(dict.fromkeys(lease_ids))
    if not distinct:
        return []
    if service is not None and function is not None:
        groups: dict[tuple[str, str], list[UUID]] = {(service, function): distinct}
    else:
        groups = {}
        for row in await conn.execute(_WHICH_MANY, {"ids": distinct}):
            groups.setdefault((row.service, row.function), []).append(row.id)
    answers: dict[UUID, LeaseSettlement] = {}
    for (svc, fn), ids in sorted(groups.items()):
        params = {"ids": ids, "action": action, "period": period}
        for row in await conn.execute(_settle_many_statement(svc, fn), params):
            answers[row.id] = _settlement(row.id, _decoded(row.answer))
    return [answers.get(i) or _unknown(i) for i in lease_ids]


def _unknown(lease_id: UUID) -> LeaseSettlement:
    return LeaseSettlement(lease_id, None, "not_found", f"lease {lease_id} does not exist (or was reaped)")


def _settlement(lease_id: UUID, data: dict[str, Any]) -> LeaseSettlement:
    refusal = data.get("error")
    if refusal is None:
        return LeaseSettlement(lease_id, data)
    return LeaseSettlement(lease_id, None, str(refusal), str(data.get("message", refusal)))


@dataclass(frozen=True, slots=True)
class ActiveLease:
    """A lease that holds its quantity (``expired``: its period ran out, no grant has noticed yet)."""

    service: str
    entity: str
    key_text: str
    quantity: Decimal
    holder: str | None
    expires_at: datetime
    expired: bool


_ACTIVE = text(
    "SELECT service, entity, key_text, quantity, holder, expires_at, "
    "expires_at <= vms.now() AS expired FROM vms.leases "
    "WHERE status = 'active' ORDER BY service, entity, key_text, expires_at"
)


async def active(conn: AsyncConnection) -> list[ActiveLease]:
    """Every active lease, by service, entity, key and expiry."""
    return [ActiveLease(*row) for row in await conn.execute(_ACTIVE)]


_REAP = text(
    """
    DELETE FROM vms.leases
     WHERE (status <> 'active' AND ended_at < vms.now() - make_interval(secs => :keep))
        OR (status = 'active' AND expires_at < vms.now() - make_interval(secs => :keep))
    """
)


async def reap(conn: AsyncConnection, keep_seconds: float) -> int:
    """Delete leases that ended (or expired) more than ``keep_seconds`` ago."""
    result = await conn.execute(_REAP, {"keep": keep_seconds})
    return int(result.rowcount)


async def advance_clock(conn: AsyncConnection, seconds: float) -> None:
    """Move the core's clock (``vms.now()``) forward; for tests of expiry without sleeping."""
    await conn.execute(
        text("UPDATE vms.clock SET offset_by = offset_by + make_interval(secs => :s)"), {"s": seconds}
    )
