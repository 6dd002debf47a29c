"""The core: one Postgres database that hosts a group of virtual microservices.

``Core`` owns the process's single connection pool, installs the catalog, registers descriptors
and hands out transactions that run under a service's role.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dbcore import eventlog, leases, reference_catalog
from dbcore.catalog import CATALOG_SCHEMA, metadata, owned_tables, services
from dbcore.descriptor import ServiceDescriptor, role_for
from dbcore.isolation import CommitStatement, autocommit_connection, service_connection
from dbcore.registry import Registration, ensure_group_role, register, sync_grants

__all__ = ["CATALOG_INSTALLED", "CATALOG_REVISION", "UNSTAMPED_REVISION", "Core", "lock_install"]

# Installing the catalog and migrating any history (``framework.migrations``) take this lock, so
# they never interleave and two processes migrating at once run one after the other. Without it
# both would read "at base", both would run the first revision, and the second would fail on what
# the first created. A transaction lock: it ends with the transaction that took it.
_INSTALL_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('vms.install'))")



async def lock_install(conn: AsyncConnection) -> None:
    """Wait for, then hold until ``conn``'s transaction ends, the catalog's install lock."""
    await conn.execute(_INSTALL_LOCK)


#: The core revision (``alembic/versions/core``) whose catalog :meth:`Core.install` creates: the
#: head. A fresh install is stamped with it, so ``vmsdb migrate`` finds it at head.
CATALOG_REVISION = "0006_reads_begin_epochs"
#: The core revision a catalog without a version table is at: :meth:`Core.install` made such
#: catalogs before it stamped itself, and then it created what ``0001_catalog`` creates.
#: ``vmsdb migrate`` stamps such a catalog with it, and the later revisions follow.
UNSTAMPED_REVISION = "0001_catalog"
# alembic's own version table, as alembic creates it (schema vms, see framework.migrations).
_VERSION_TABLE = text(
    "CREATE TABLE vms.alembic_version (version_num VARCHAR(32) NOT NULL, "
    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)
_VERSIONED = text("SELECT to_regclass('vms.alembic_version') IS NOT NULL")
#: One boolean: is the catalog there (made by :meth:`Core.install` or the core's first revision)?
#: A statement rather than a function, for sync (alembic) and async connections alike.
CATALOG_INSTALLED = text("SELECT to_regclass('vms.services') IS NOT NULL")


class Core:
    """A Postgres-backed core. Create with :meth:`connect`; close with :meth:`close`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._table_owners: dict[str, str] = {}

    @classmethod
    def connect(cls, url: str, *, pool_size: int = 10, max_overflow: int = 10) -> Core:
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_pre_ping=False,
            # service_connection() sends BEGIN itself (with the role): SQLAlchemy must not.
            isolation_level="AUTOCOMMIT",
            # Prepared-statement cache per connection; asyncpg's own cache is per statement text.
            connect_args={"server_settings": {"application_name": "vmsdb"}},
        )
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def admin(self, *, isolation: str = "read_committed") -> AsyncIterator[AsyncConnection]:
        """A transaction as the administrative role (catalog work, registration).

        ``isolation``: ``"snapshot"`` to read the catalog and the services as of one moment.
        """
        async with service_connection(self.engine, None, isolation=isolation) as conn:
            yield conn

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """The administrator outside a transaction: each statement is its own transaction."""
        async with autocommit_connection(self.engine) as conn:
            yield conn

    @asynccontextmanager
    async def transaction(
        self,
        service: str,
        *,
        isolation: str = "read_committed",
        read_only: bool = False,
        connection: AsyncConnection | None = None,
        before_commit: CommitStatement | None = None,
    ) -> AsyncIterator[AsyncConnection]:
        """A transaction that runs under ``service``'s role.

        ``connection``: on this (already checked out) connection rather than a pooled one;
        ``before_commit``: a statement sent together with ``COMMIT`` (see ``service_connection``).
        """
        async with service_connection(
            self.engine,
            role_for(service),
            isolation=isolation,
            read_only=read_only,
            connection=connection,
            before_commit=before_commit,
        ) as conn:
            yield conn

    async def install(self) -> None:
        """Create the catalog if it is missing. Safe to run concurrently from many processes."""
        async with self.admin() as conn:
            await lock_install(conn)
            await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {CATALOG_SCHEMA}"))
            await conn.run_sync(metadata.create_all)
            await ensure_group_role(conn)
            for statement in (*eventlog.install_sql, *leases.install_sql):
                await conn.execute(text(statement))
            await reference_catalog.install(conn)
            if not (await conn.execute(_VERSIONED)).scalar_one():  # else alembic keeps it
                await conn.execute(_VERSION_TABLE)
                await conn.execute(
                    text("INSERT INTO vms.alembic_version (version_num) VALUES (:v)"),
                    {"v": CATALOG_REVISION},
                )

    async def register(self, descriptors: Iterable[ServiceDescriptor]) -> list[Registration]:
        """Register descriptors in one transaction: all of them, or none."""
        async with self.admin() as conn:
            result = [await register(conn, d) for d in descriptors]
        await self.refresh_owners()
        return result

    async def sync_grants(self, descriptors: Iterable[ServiceDescriptor]) -> None:
        async with self.admin() as conn:
            for d in descriptors:
                await sync_grants(conn, d)

    async def refresh_owners(self) -> None:
        """Reload which service owns which table, for naming services in ``IsolationError``."""
        async with self.admin() as conn:
            rows = (
                await conn.execute(
                    select(
                        owned_tables.c.schema_name,
                        owned_tables.c.table_name,
                        owned_tables.c.service,
                    )
                )
            ).all()
            names = (await conn.execute(select(services.c.name))).scalars().all()
        owners: dict[str, str] = {name: name for name in names}
        for schema, table, service in rows:
            owners[f"{schema}.{table}"] = service
            # A bare table name (as Postgres reports it) is only meaningful when unambiguous.
            owners[table] = service if owners.get(table, service) == service else ""
        self._table_owners = {k: v for k, v in owners.items() if v}

    @property
    def table_owners(self) -> dict[str, str]:
        return self._table_owners

    async def wait_ready(self, attempts: int = 50, delay: float = 0.1) -> None:
        """Wait until the server accepts connections (a freshly started server may not yet)."""
        for attempt in range(attempts):
            try:
                async with self.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                return
            except OSError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(delay)
