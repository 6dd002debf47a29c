"""Registration: turn a service descriptor into a schema, a role, grants and catalog rows.

Registration is idempotent and safe to run from several processes at once: it holds a
transaction-scoped advisory lock, and every DDL statement tolerates what already exists. A
descriptor whose fingerprint differs from the registered one becomes a new version.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import (
    SERVICES_GROUP_ROLE,
    event_types,
    outbound,
    owned_tables,
    quote_ident,
    quote_literal,
    service_versions,
    services,
    subscriptions,
)
from dbcore.descriptor import ServiceDescriptor
from dbcore.exports import install_exported_functions
from dbcore.leases import install_lease_functions
from dbcore.logins import grant_login
from dbcore.reference_events import PROTOCOL_EVENTS
from dbcore.replicas import change_event_type, install_replicas

__all__ = ["Registration", "register", "sync_grants"]

# One lock key for all registrations in a database; hashtext is stable across sessions.
REGISTRY_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('vms.registry'))")

# Roles are cluster-wide while advisory locks are per database, so two databases on one server
# (parallel test runs) can race to create the same role: swallow the loser's error.
CREATE_ROLE = """
DO $$ BEGIN
    CREATE ROLE {role} NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$
"""
# SET FALSE: the group's rights are inherited (exported tables), but a service cannot SET ROLE to
# it, so its sessions are only ever itself (Postgres 16+).
JOIN_GROUP = """
DO $$ BEGIN
    GRANT {group} TO {role} WITH INHERIT TRUE, SET FALSE;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$
"""


@dataclass(frozen=True)
class Registration:
    service: str
    version: int
    changed: bool


async def _ensure_role(conn: AsyncConnection, role: str) -> None:
    await conn.execute(text(CREATE_ROLE.format(role=quote_ident(role))))


async def ensure_group_role(conn: AsyncConnection) -> None:
    await _ensure_role(conn, SERVICES_GROUP_ROLE)


async def apply_limits(conn: AsyncConnection, descriptor: ServiceDescriptor) -> None:
    """Give the service's role its ``ServiceLimits``, enforced by Postgres for every login of it.

    ``CONNECTION LIMIT`` (-1: none) counts the role's connections in every process and
    database; ``statement_timeout`` (this database's sessions of the role; 0: none) cancels any
    longer statement. Both are set every time, so removed limits are reset. A new setting
    applies to sessions opened after it: registration runs before the App opens its pools.
    """
    role = quote_ident(descriptor.role)
    limits = descriptor.limits
    connections = -1 if limits.connections is None else limits.connections
    await conn.execute(text(f"ALTER ROLE {role} CONNECTION LIMIT {int(connections)}"))
    database = quote_ident((await conn.execute(text("SELECT current_database()"))).scalar_one())
    in_database = f"ALTER ROLE {role} IN DATABASE {database}"
    if limits.statement_timeout_ms is None:
        await conn.execute(text(f"{in_database} RESET statement_timeout"))
    else:
        timeout = quote_literal(f"{int(limits.statement_timeout_ms)}ms")
        await conn.execute(text(f"{in_database} SET statement_timeout = {timeout}"))


async def register(
    conn: AsyncConnection,
    descriptor: ServiceDescriptor,
    *,
    password: str | None = None,
    idle_timeout_ms: int | None = None,
) -> Registration:
    """Create or update everything the core keeps for ``descriptor``; runs in ``conn``'s transaction.

    ``password``: make the service's role a login role with it (see ``dbcore.logins``), its
    sessions' ``idle_in_transaction_session_timeout`` ``idle_timeout_ms``.
    """
    await conn.execute(REGISTRY_LOCK)
    role, schema = quote_ident(descriptor.role), quote_ident(descriptor.schema_name)
    group = quote_ident(SERVICES_GROUP_ROLE)
    await ensure_group_role(conn)
    await _ensure_role(conn, descriptor.role)
    await conn.execute(text(JOIN_GROUP.format(group=group, role=role)))
    if password is not None:
        await grant_login(conn, descriptor.role, password, idle_timeout_ms=idle_timeout_ms, read_only=True)
    await apply_limits(conn, descriptor)
    await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}"))
    await conn.execute(text(f"ALTER SCHEMA {schema} OWNER TO {role}"))
    await conn.execute(text(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC"))
    # USAGE lets other services name objects in the schema; it grants no access to any table.
    # Table privileges decide what is readable: only exported tables are granted, read-only.
    await conn.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {group}"))
    # Functions are executable by PUBLIC by default; a service's functions are private unless
    # the core grants them (lease functions, exported query functions).
    await conn.execute(
        text(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {role} IN SCHEMA {schema} "
            "REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC"
        )
    )

    fingerprint = descriptor.fingerprint()
    payload = descriptor.to_json()
    current = (
        await conn.execute(
            select(services.c.version, services.c.fingerprint).where(services.c.name == descriptor.name)
        )
    ).one_or_none()
    if current is not None and current.fingerprint == fingerprint:
        version, changed = current.version, False
    else:
        version, changed = (1 if current is None else current.version + 1), True
        stmt = insert(services).values(
            name=descriptor.name,
            schema_name=descriptor.schema_name,
            role_name=descriptor.role,
            version=version,
            fingerprint=fingerprint,
            descriptor=payload,
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[services.c.name],
                set_={
                    "version": stmt.excluded.version,
                    "fingerprint": stmt.excluded.fingerprint,
                    "descriptor": stmt.excluded.descriptor,
                    "updated_at": text("now()"),
                },
            )
        )
        await conn.execute(
            insert(service_versions).values(
                service=descriptor.name,
                version=version,
                fingerprint=fingerprint,
                descriptor=payload,
            )
        )
        await _record_contract(conn, descriptor)
    await _record_outbound(conn, descriptor)
    await sync_grants(conn, descriptor)
    await install_lease_functions(conn, descriptor)
    return Registration(service=descriptor.name, version=version, changed=changed)


async def _record_contract(conn: AsyncConnection, descriptor: ServiceDescriptor) -> None:
    """Catalog rows derived from the descriptor: owned tables, event types, subscriptions."""
    await conn.execute(delete(owned_tables).where(owned_tables.c.service == descriptor.name))
    if descriptor.tables:
        await conn.execute(
            insert(owned_tables),
            [
                {
                    "schema_name": descriptor.schema_name,
                    "table_name": t.name,
                    "service": descriptor.name,
                    "entity": t.entity,
                    "exported": t.exported,
                }
                for t in descriptor.tables
            ],
        )
    for event in descriptor.events:
        stmt = insert(event_types).values(name=event.name, key_field=event.key, json_schema=event.json_schema)
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[event_types.c.name],
                set_={
                    "key_field": stmt.excluded.key_field,
                    "json_schema": stmt.excluded.json_schema,
                    "updated_at": text("now()"),
                },
            )
        )
    await conn.execute(delete(subscriptions).where(subscriptions.c.service == descriptor.name))
    rows = [
        {
            "service": descriptor.name,
            "event_type": i.event,
            "handler": i.handler,
            "precedence": list(i.precedence),
            "max_attempts": i.max_attempts,
        }
        for i in descriptor.inbound
    ]
    # An eventual replica's holder subscribes to its source table's change events.
    rows += [
        {
            "service": descriptor.name,
            "event_type": change_event_type(r.source_service, r.source_table),
            "handler": f"(replica {r.table})",
            "precedence": [],
            "max_attempts": 5,
        }
        for r in descriptor.replicas
        if r.consistency == "eventual"
    ]
    if rows:
        await conn.execute(insert(subscriptions), rows)


async def _record_outbound(conn: AsyncConnection, descriptor: ServiceDescriptor) -> None:
    """The event types the service may insert (``vms.outbound``): exactly its @Outbound ones,
    and the core's reference protocol for a service that takes part in references.

    On every registration, not only a changed one: a catalog that gained the table later (a
    migration, ``Core.install`` on an older catalog) is filled on the next start.
    """
    declared = list(descriptor.emitted_events)
    if descriptor.declares_references:  # the reference and recovery protocol (G9, G10)
        declared += [e for e in PROTOCOL_EVENTS if e not in declared]
    await conn.execute(
        delete(outbound).where(outbound.c.service == descriptor.name, outbound.c.event_type.not_in(declared))
    )
    if declared:
        await conn.execute(
            insert(outbound)
            .values([{"service": descriptor.name, "event_type": e} for e in declared])
            .on_conflict_do_nothing()
        )


_EXISTING_TABLES = text(
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'v', 'm')"
)


async def sync_grants(conn: AsyncConnection, descriptor: ServiceDescriptor) -> None:
    """Grant read access on exactly the exported tables that exist; revoke it from the rest.

    Also (re)creates the exported SQL functions of the tables that exist.

    Run after registration and again after tables are created or migrated, so a table added
    later gets the same isolation as one that existed at registration.
    """
    group = quote_ident(SERVICES_GROUP_ROLE)
    schema = quote_ident(descriptor.schema_name)
    existing = set((await conn.execute(_EXISTING_TABLES, {"schema": descriptor.schema_name})).scalars())
    exported = {t.name for t in descriptor.exported_tables}
    for table in sorted(existing):
        qualified = f"{schema}.{quote_ident(table)}"
        await conn.execute(text(f"REVOKE ALL ON {qualified} FROM PUBLIC, {group}"))
        if table in exported:
            await conn.execute(text(f"GRANT SELECT ON {qualified} TO {group}"))
    # An exported function takes its entity's row type, so it can exist only once the table does.
    await install_exported_functions(conn, descriptor, existing)
    # Likewise a replica's trigger needs both tables; whichever sync comes last installs it.
    await install_replicas(conn)
