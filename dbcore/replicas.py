"""Replicas: a service's read-optimised copy of another service's exported entity.

The holder declares the replica; the core maintains it with a row trigger on the source table,
installed by the administrator (the source's owner never grants the holder anything more):

- ``strong``: the trigger writes the replica in the same transaction as the source change, so
  the replica equals its source after every commit.
- ``eventual``: the trigger appends a change event to the log, which the holder handles like
  any other event (ordered per key, exactly once). Applying it is guarded by the version column:
  an older change never overwrites a newer one, whatever order changes arrive in.

A replica created on a source that already has rows is filled from it when its trigger is
installed. ``check`` compares every replica with its source.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import quote_ident, services
from dbcore.descriptor import ReplicaDescriptor, ServiceDescriptor

__all__ = ["ReplicaDiff", "apply_change", "change_event_type", "check", "install_replicas"]

_EXISTING = text(
    "SELECT n.nspname || '.' || c.relname FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')"
)


def change_event_type(source_service: str, source_table: str) -> str:
    """The event type of an eventual replica's change events (one per source table)."""
    return f"vms.change.{source_service}.{source_table}"


def _names(replica: ReplicaDescriptor, holder: str) -> tuple[str, str, str]:
    source = f"{quote_ident(replica.source_service)}.{quote_ident(replica.source_table)}"
    target = f"{quote_ident(holder)}.{quote_ident(replica.table)}"
    suffix = f"{holder}__{replica.table}"
    return source, target, suffix


def _upsert(replica: ReplicaDescriptor, target: str, rows: str) -> str:
    """Insert ``rows``, or update an existing row only when the incoming version is newer."""
    cols = ", ".join(quote_ident(c) for c in replica.columns)
    keys = ", ".join(quote_ident(c) for c in replica.key)
    updates = ", ".join(
        f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in replica.columns if c not in replica.key
    )
    guard = ""
    if replica.version is not None:
        v = quote_ident(replica.version)
        guard = f" WHERE {target}.{v} IS NULL OR {target}.{v} < EXCLUDED.{v}"
    action = f"DO UPDATE SET {updates}{guard}" if updates else "DO NOTHING"
    return f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {rows} ON CONFLICT ({keys}) {action}"


def _delete(replica: ReplicaDescriptor, target: str, ref: str, using: str = "") -> str:
    """Delete the replica row of ``ref``'s key, unless the replica already holds a newer version."""
    match = " AND ".join(f"t.{quote_ident(c)} = {ref}.{quote_ident(c)}" for c in replica.key)
    if replica.version is not None:
        v = quote_ident(replica.version)
        match += f" AND (t.{v} IS NULL OR t.{v} <= {ref}.{v})"
    using_clause = f" USING {using}" if using else ""
    return f"DELETE FROM {target} t{using_clause} WHERE {match}"


def _trigger_body(replica: ReplicaDescriptor, holder: str) -> str:
    source, target, _ = _names(replica, holder)
    if replica.consistency == "strong":
        # Same transaction as the source change: the replica equals its source at every commit.
        return f"""
        BEGIN
            IF TG_OP = 'DELETE' THEN
                {_delete(replica, target, "OLD")};
            ELSE
                {_upsert(replica, target, "(SELECT NEW.*) n")};
            END IF;
            RETURN NULL;
        END"""
    cols = ", ".join(quote_ident(c) for c in replica.columns)
    key = " || '/' || ".join(f"changed.{quote_ident(c)}::text" for c in replica.key)
    return f"""
        DECLARE
            changed {source};
        BEGIN
            changed := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
            INSERT INTO vms.events (id, type, key, payload, producer)
            SELECT gen_random_uuid(), '{change_event_type(replica.source_service, replica.source_table)}',
                   {key},
                   jsonb_build_object('op', CASE WHEN TG_OP = 'DELETE' THEN 'delete' ELSE 'upsert' END,
                                      'row', to_jsonb(r)),
                   '{replica.source_service}'
              FROM (SELECT {cols} FROM (SELECT changed.*) c) r;
            RETURN NULL;
        END"""


_TRIGGER_EXISTS = text(
    "SELECT 1 FROM pg_trigger WHERE tgname = :name AND tgrelid = CAST(:source AS regclass)"
)


async def _install(conn: AsyncConnection, replica: ReplicaDescriptor, holder: str) -> None:
    source, target, suffix = _names(replica, holder)
    function = f"vms.{quote_ident('replicate__' + suffix)}"
    trigger = f"vms_replicate__{suffix}"
    await conn.execute(
        text(
            f"""
            CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
            AS $fn${_trigger_body(replica, holder)}
            $fn$
            """
        )
    )
    await conn.execute(text(f"REVOKE ALL ON FUNCTION {function}() FROM PUBLIC"))
    params = {"name": trigger, "source": source}
    if (await conn.execute(_TRIGGER_EXISTS, params)).first() is not None:
        return  # creating a trigger locks the source table: only when it is missing
    await conn.execute(
        text(
            f"CREATE TRIGGER {quote_ident(trigger)} AFTER INSERT OR UPDATE OR DELETE ON {source} "
            f"FOR EACH ROW EXECUTE FUNCTION {function}()"
        )
    )
    # Fill from what the source already holds (version-guarded, so a re-run changes nothing).
    await conn.execute(text(_upsert(replica, target, f"{source} src")))


async def install_replicas(conn: AsyncConnection) -> None:
    """Install the trigger of every registered replica whose two tables exist.

    Reads every descriptor in the catalog, so whichever process creates the last of the two
    tables (source or replica) installs the trigger.
    """
    existing = set((await conn.execute(_EXISTING)).scalars())
    for holder in await registered(conn):
        for replica in holder.replicas:
            if f"{replica.source_service}.{replica.source_table}" not in existing:
                continue
            if f"{holder.name}.{replica.table}" not in existing:
                continue
            await _install(conn, replica, holder.name)


async def registered(conn: AsyncConnection) -> list[ServiceDescriptor]:
    rows = (await conn.execute(select(services.c.descriptor))).scalars().all()
    return [ServiceDescriptor.from_json(r if isinstance(r, dict) else json.loads(r)) for r in rows]


async def apply_change(
    conn: AsyncConnection, holder: str, replica: ReplicaDescriptor, payload: dict[str, Any]
) -> None:
    """Apply one change event of an eventual replica (runs in the holder's transaction)."""
    _, target, _ = _names(replica, holder)
    row = f"jsonb_populate_record(NULL::{target}, CAST(:row AS jsonb)) d"
    if payload["op"] == "delete":
        statement = _delete(replica, target, "d", using=row)
    else:
        statement = _upsert(replica, target, row)
    await conn.execute(text(statement), {"row": json.dumps(payload["row"])})


@dataclass(frozen=True)
class ReplicaDiff:
    holder: str
    table: str
    source: str
    consistency: str
    missing: int  # source rows absent from the replica
    extra: int  # replica rows absent from the source
    different: int  # same key, other values
    pending: int  # change events not yet applied (eventual replicas)

    @property
    def ok(self) -> bool:
        return self.missing == self.extra == self.different == 0


async def check(
    conn: AsyncConnection, holders: Sequence[ServiceDescriptor] | None = None
) -> list[ReplicaDiff]:
    """Compare every replica with its source, as of one snapshot."""
    result = []
    for holder in holders if holders is not None else await registered(conn):
        for replica in holder.replicas:
            source, target, _ = _names(replica, holder.name)
            cols = ", ".join(quote_ident(c) for c in replica.columns)
            keys = ", ".join(quote_ident(c) for c in replica.key)
            counts = (
                await conn.execute(
                    text(
                        f"""
                        WITH s AS (SELECT {cols} FROM {source}), r AS (SELECT {cols} FROM {target}),
                             sk AS (SELECT {keys} FROM s), rk AS (SELECT {keys} FROM r)
                        SELECT (SELECT count(*) FROM (SELECT * FROM sk EXCEPT SELECT * FROM rk) a),
                               (SELECT count(*) FROM (SELECT * FROM rk EXCEPT SELECT * FROM sk) b),
                               (SELECT count(*) FROM (SELECT * FROM s EXCEPT SELECT * FROM r) c),
                               (SELECT count(*) FROM vms.deliveries
                                 WHERE subscriber = :holder AND event_type = :etype)
                        """
                    ),
                    {
                        "holder": holder.name,
                        "etype": change_event_type(replica.source_service, replica.source_table),
                    },
                )
            ).one()
            missing, extra, unequal, pending = (int(v) for v in counts)
            result.append(
                ReplicaDiff(
                    holder=holder.name,
                    table=replica.table,
                    source=f"{replica.source_service}.{replica.source_table}",
                    consistency=replica.consistency,
                    missing=missing,
                    extra=extra,
                    different=unequal - missing,
                    pending=pending,
                )
            )
    return result
