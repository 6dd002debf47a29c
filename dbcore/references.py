"""Weak global referential integrity (G9): referenceable entities and ``(URI, t, k)`` references.

After Manouvrier, Pautasso and Rukoz, *Microservice disaster crash recovery: a weak global
referential integrity management*. An owner marks tables as referenceable; every row is then an
entity ``vms://<service>/<table>/<key>``, whose metadata ``(t, k, d, ⊥)`` a row trigger keeps in
the core (see ``reference_catalog.py``). A holder stores ``Ref(uri, t, k[, copy])`` in a JSONB
column and declares where, so that the checkers and the recovery protocol can find it.

Within one core, :func:`get_reference` (``d += 1``), :func:`get_references` (many, in one
statement), :func:`refresh_reference` and :func:`delete_reference` (``d -= 1``) run in the
caller's transaction. Across cores the same operations travel as events (``reference_events.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import quote_ident, quote_literal
from dbcore.descriptor import ServiceDescriptor
from dbcore.errors import CoreError, EntityDeleted, EntityNotFound, ServiceRecovering, TruncateRefused
from dbcore.reference_catalog import clock_sequence
from dbcore.translate import translated

__all__ = [
    "EntityDeleted",
    "EntityNotFound",
    "Ref",
    "ReferenceResult",
    "ServiceRecovering",
    "TruncateRefused",
    "delete_reference",
    "get_reference",
    "get_references",
    "install_service",
    "parse_uri",
    "primary_key",
    "read_entities",
    "recovering_services",
    "refresh_reference",
    "services_in_amnesia",
    "uri_expression",
    "uri_for",
]


# -- declaring what is referenceable and where references are kept ----------------------------


def _trigger_function(service: str, table: str) -> str:
    name = f"entity__{service}__{table}"
    if len(name) > 63:  # Postgres truncates longer names: keep them distinct
        name = "entity__" + hashlib.sha256(f"{service}.{table}".encode()).hexdigest()[:24]
    return f"vms.{quote_ident(name)}"


def uri_expression(service: str, table: str, keys: Sequence[str], row: str) -> str:
    """SQL building the URI of ``row`` (``NEW``, ``OLD``, an alias): same text as :func:`uri_for`."""
    parts = " || '/' || ".join(f"vms.uri_part({row}.{quote_ident(c)}::text)" for c in keys)
    return f"{quote_literal(f'vms://{service}/{table}/')} || {parts}"


def _key_expression(keys: Sequence[str], row: str) -> str:
    return (
        "jsonb_build_object(" + ", ".join(f"{quote_literal(c)}, {row}.{quote_ident(c)}" for c in keys) + ")"
    )


_PRIMARY_KEY = text(
    """
    SELECT a.attname FROM pg_index i
      JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = to_regclass(:table) AND i.indisprimary ORDER BY k.n
    """
)


async def primary_key(conn: AsyncConnection, schema: str, table: str) -> list[str]:
    qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
    return list((await conn.execute(_PRIMARY_KEY, {"table": qualified})).scalars())


_EXISTS = text("SELECT to_regclass(:t) IS NOT NULL")
_FORGET_UNDECLARED = (
    "DELETE FROM vms.referenceables WHERE service = :s AND NOT entity = ANY(CAST(:tables AS text[]))",
    "DELETE FROM vms.reference_columns WHERE holder = :s "
    "AND NOT holder_table || '.' || column_name = ANY(CAST(:columns AS text[]))",
)
_REFERENCEABLE = text(
    "INSERT INTO vms.referenceables VALUES (:s, :t, :k) "
    "ON CONFLICT (service, entity) DO UPDATE SET key_columns = EXCLUDED.key_columns"
)
_REFERENCE_COLUMN = text(
    "INSERT INTO vms.reference_columns VALUES (:h, :t, :c, :ts, :te, :k) "
    "ON CONFLICT (holder, holder_table, column_name) DO UPDATE SET target_service = EXCLUDED.target_service, "
    "target_entity = EXCLUDED.target_entity, key_columns = EXCLUDED.key_columns"
)


async def install_service(conn: AsyncConnection, descriptor: ServiceDescriptor) -> None:
    """Make the tables ``descriptor`` declares referenceable so, and record its reference columns
    (administrator).

    Run once the tables exist (as ``sync_grants`` is); a table that does not exist yet (or any
    more: a crashed service) keeps what the catalog knew of it. Rows already in a table become
    entities at the current clock. Idempotent.
    """
    service = descriptor.name
    await conn.execute(text(f"CREATE SEQUENCE IF NOT EXISTS {clock_sequence(service)}"))
    await conn.execute(
        text("INSERT INTO vms.ref_services (service) VALUES (:s) ON CONFLICT DO NOTHING"), {"s": service}
    )
    declared = {
        "s": service,
        "tables": [r.table for r in descriptor.referenceable],
        "columns": [f"{c.table}.{c.column}" for c in descriptor.reference_columns],
    }
    for statement in _FORGET_UNDECLARED:
        await conn.execute(text(statement), declared)
    for table in (r.table for r in descriptor.referenceable):
        if not (await conn.execute(_EXISTS, {"t": f"{quote_ident(service)}.{quote_ident(table)}"})).scalar():
            continue
        keys = await primary_key(conn, service, table)
        if not keys:
            raise CoreError(f"{service}.{table} is referenceable, so it needs a primary key: it has none")
        await conn.execute(_REFERENCEABLE, {"s": service, "t": table, "k": keys})
        await _install_trigger(conn, service, table, keys)
    for col in descriptor.reference_columns:
        keys = await primary_key(conn, service, col.table)
        if keys:
            params = {"h": service, "t": col.table, "c": col.column, "k": keys}
            await conn.execute(
                _REFERENCE_COLUMN, {**params, "ts": col.target_service, "te": col.target_table}
            )


async def _install_trigger(conn: AsyncConnection, service: str, table: str, keys: Sequence[str]) -> None:
    function = _trigger_function(service, table)
    qualified = f"{quote_ident(service)}.{quote_ident(table)}"
    svc, tbl = quote_literal(service), quote_literal(table)
    # A key change is the old entity deleted and a new one written.
    await conn.execute(
        text(
            f"""
            CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
            DECLARE old_uri text; new_uri text;
            BEGIN
                IF TG_OP <> 'INSERT' THEN old_uri := {uri_expression(service, table, keys, "OLD")}; END IF;
                IF TG_OP <> 'DELETE' THEN new_uri := {uri_expression(service, table, keys, "NEW")}; END IF;
                IF old_uri IS DISTINCT FROM new_uri AND old_uri IS NOT NULL THEN
                    PERFORM vms.ref_deleted({svc}, old_uri, to_jsonb(OLD));
                END IF;
                IF new_uri IS NOT NULL THEN
                    PERFORM vms.ref_written({svc}, {tbl}, new_uri, {_key_expression(keys, "NEW")});
                END IF;
                RETURN NULL;
            END $fn$
            """
        )
    )
    await conn.execute(text(f"REVOKE ALL ON FUNCTION {function}() FROM PUBLIC"))
    triggers = {
        "vms_entity": f"AFTER INSERT OR UPDATE OR DELETE ON {qualified} "
        f"FOR EACH ROW EXECUTE FUNCTION {function}()",
        "vms_entity_truncate": f"BEFORE TRUNCATE ON {qualified} "
        "FOR EACH STATEMENT EXECUTE FUNCTION vms.ref_refuse_truncate()",
    }
    existing = set(
        (
            await conn.execute(
                text("SELECT tgname FROM pg_trigger WHERE tgrelid = CAST(:t AS regclass)"), {"t": qualified}
            )
        ).scalars()
    )
    for name, definition in triggers.items():
        if name not in existing:  # creating a trigger locks the table: only when it is missing
            await conn.execute(text(f"CREATE TRIGGER {name} {definition}"))
    await conn.execute(
        text(
            f"""
            INSERT INTO vms.entities (uri, service, entity, key, t, k)
            SELECT r.uri, {svc}, {tbl}, r.key, vms.ref_tick({svc}),
                   (SELECT epoch FROM vms.ref_services WHERE service = {svc})
              FROM (SELECT {uri_expression(service, table, keys, "x")} AS uri,
                           {_key_expression(keys, "x")} AS key FROM {qualified} x) r
             WHERE NOT EXISTS (SELECT 1 FROM vms.entities e WHERE e.uri = r.uri)
            """
        )
    )


# -- references --------------------------------------------------------------------------------


def _uri_part(value: object) -> str:
    # Exactly what vms.uri_part() does in the trigger, so both sides build the same URI.
    return str(value).replace("%", "%25").replace("/", "%2F")


def uri_for(service: str, entity: str, *key: object) -> str:
    """``vms://<service>/<entity>/<key>``; composite keys in primary-key order, ``/``-separated."""
    return f"vms://{service}/{entity}/" + "/".join(_uri_part(k) for k in key)


def parse_uri(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """``(service, entity, key parts)`` of an entity URI; ``ValueError`` if it is not one."""
    if not uri.startswith("vms://"):
        raise ValueError(f"{uri!r} is not an entity URI (vms://<service>/<entity>/<key>)")
    service, _, rest = uri[len("vms://") :].partition("/")
    entity, _, key = rest.partition("/")
    if not service or not entity or not key:
        raise ValueError(f"{uri!r} is not an entity URI (vms://<service>/<entity>/<key>)")
    return service, entity, tuple(p.replace("%2F", "/").replace("%25", "%") for p in key.split("/"))


@dataclass(frozen=True)
class Ref:
    """A reference as a holder stores it: the URI, the version seen ``(t, k)``, a cached copy."""

    uri: str
    t: int
    k: int
    copy: dict[str, Any] | None = None
    deleted: bool = False

    @property
    def service(self) -> str:
        return parse_uri(self.uri)[0]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"uri": self.uri, "t": self.t, "k": self.k}
        if self.copy is not None:
            data["copy"] = self.copy
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ref:
        copy = data.get("copy")
        return cls(data["uri"], int(data["t"]), int(data["k"]), copy, bool(data.get("deleted", False)))


_GET = text("SELECT vms.get_reference(:uri, :count, :copy, CAST(:columns AS text[]), :holder)")
_DELETE = text("SELECT vms.delete_reference(:uri, :holder)")


async def _call(conn: AsyncConnection, statement: Any, params: dict[str, Any]) -> Any:
    with translated():  # the core's own refusals; a permission error surfaces where the service is known
        return (await conn.execute(statement, params)).scalar_one()


async def get_reference(
    conn: AsyncConnection,
    uri: str,
    *,
    copy: bool | Sequence[str] = False,
    holder: str | None = None,
    count: bool = True,
) -> Ref:
    """Take a reference in ``conn``'s transaction: ``d += 1``; return ``(uri, t, k[, copy])``.

    ``copy``: also return the entity's row (``True``) or those columns of it (plus its key).
    ``holder`` is needed only when the administrator calls; a service is its own holder.
    Raises ``EntityNotFound``, ``EntityDeleted`` or ``ServiceRecovering``.
    """
    columns = None if isinstance(copy, bool) else list(copy)
    raw = await _call(
        conn,
        _GET,
        {"uri": uri, "count": count, "copy": copy is not False, "columns": columns, "holder": holder},
    )
    return Ref.from_json(_decoded(raw))


@dataclass(frozen=True, slots=True)
class ReferenceResult:
    """One entity's answer in a batch of :func:`get_references`: the reference taken, or the
    refusal (and then nothing was counted for it).

    ``refusal`` says why not: ``"not_found"`` (no such entity) or ``"deleted"`` (a tombstone).
    """

    uri: str
    ref: Ref | None
    refusal: str | None = None
    message: str | None = None

    @property
    def taken(self) -> bool:
        return self.refusal is None

    def error(self) -> EntityNotFound | EntityDeleted | None:
        """The error :func:`get_reference` raises for this refusal, or ``None``."""
        if self.refusal is None:
            return None
        error = EntityDeleted if self.refusal == "deleted" else EntityNotFound
        return error(self.message or f"{self.uri}: {self.refusal}")

    def raise_if_refused(self) -> None:
        """Raise :meth:`error`, if the reference was refused."""
        error = self.error()
        if error is not None:
            raise error


#: Each entity of a batch: its URI, or ``(URI, copy)`` to copy otherwise than the batch's default.
Target = str | tuple[str, bool | Sequence[str]]

_GET_MANY = text("SELECT vms.get_references(CAST(:uris AS text[]), :count, CAST(:copies AS jsonb), :holder)")


def _copy_json(copy: bool | Sequence[str]) -> bool | list[str]:
    return copy if isinstance(copy, bool) else list(copy)


async def get_references(
    conn: AsyncConnection,
    targets: Sequence[Target],
    *,
    copy: bool | Sequence[str] = False,
    holder: str | None = None,
    count: bool = True,
) -> list[ReferenceResult]:
    """:func:`get_reference` of many entities in ``conn``'s transaction, in one statement however
    many; one :class:`ReferenceResult` per target, in the order given.

    A target is a URI (copied as ``copy`` says) or ``(uri, copy)``. The same URI twice is two
    references. Nothing is raised for a refused entity and the transaction stays usable: a
    refusal is an answer, not an error, so no savepoint is needed around the call. The entities
    are locked in URI order, so two batches over the same entities, in any orders, cannot
    deadlock each other. Raises ``ServiceRecovering`` (for the whole batch: that is a state of
    an owner, not of one entity) while an owner recovers in consistency mode.
    """
    if not targets:
        return []
    uris = [t if isinstance(t, str) else t[0] for t in targets]
    copies = [_copy_json(copy if isinstance(t, str) else t[1]) for t in targets]
    params = {"uris": uris, "count": count, "copies": json.dumps(copies), "holder": holder}
    answers = _decoded(await _call(conn, _GET_MANY, params))
    return [_result(uri, answer) for uri, answer in zip(uris, answers, strict=True)]


def _decoded(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


def _result(uri: str, answer: dict[str, Any]) -> ReferenceResult:
    refusal = answer.get("error")
    if refusal is None:
        return ReferenceResult(uri, Ref.from_json(answer))
    return ReferenceResult(uri, None, str(refusal), str(answer.get("message", refusal)))


async def refresh_reference(
    conn: AsyncConnection, uri: str, *, copy: bool | Sequence[str] = True, holder: str | None = None
) -> Ref:
    """The entity's current ``(t, k[, copy])`` without counting a new reference.

    A tombstone answers with ``deleted=True`` and its last value.
    """
    return await get_reference(conn, uri, copy=copy, holder=holder, count=False)


async def delete_reference(conn: AsyncConnection, uri: str, *, holder: str | None = None) -> bool:
    """Give a reference back: ``d -= 1``; a tombstone whose ``d`` reaches 0 is removed.

    Returns ``False`` when the holder had no counted reference to ``uri`` (nothing changes).
    """
    return bool(await _call(conn, _DELETE, {"uri": uri, "holder": holder}))


_READ = text("SELECT vms.ref_read(:s, :e, CAST(:uris AS text[]))")


async def read_entities(
    conn: AsyncConnection, service: str, uris: Sequence[str] | None = None, *, table: str | None = None
) -> bool:
    """Record, in ``conn``'s transaction, that these entities of ``service`` were read: the
    given ``uris``, or (``uris=None``) every entity of ``table``, for a read that cannot say
    which rows it saw.

    The first read of an entity restored from a backup begins its new epoch (recovery paper,
    Definition 2): its amnesia interval closes at the read, and a merge will no longer overwrite
    the value that was read (it reports the holder's copy as a conflict). Needs a read-write
    transaction. Returns whether ``service`` still has restored entities nobody read or wrote:
    when it does not, reads of it need not call this any more. Raises ``ServiceRecovering`` in
    consistency mode.
    """
    if uris is None and table is None:
        raise ValueError("read_entities() needs the URIs read, or the table they were read from")
    values = None if uris is None else list(uris)
    return bool(await _call(conn, _READ, {"s": service, "e": table, "uris": values}))


_IN_AMNESIA = text("SELECT DISTINCT service FROM vms.entities WHERE restored_by IS NOT NULL")


async def services_in_amnesia(conn: AsyncConnection) -> set[str]:
    """Services with restored entities not yet read or written since their restore."""
    return set((await conn.execute(_IN_AMNESIA)).scalars())


_RECOVERING = text("SELECT service FROM vms.ref_services WHERE recovering = 'consistency'")


async def recovering_services(conn: AsyncConnection) -> set[str]:
    """The services recovering in consistency mode (G10): they serve nothing until it ends."""
    return set((await conn.execute(_RECOVERING)).scalars())
