"""The core: one Postgres database that hosts a group of virtual microservices.

``Core`` owns the process's connection pools, installs the catalog, registers descriptors and
hands out transactions. Once :meth:`Core.use_logins` ran (a started App), each service's
transactions run on a pool of connections logged in as that service's role, and the App's
housekeeping on a pool logged in as the core role (``dbcore.logins``); the administrator's pool
(the URL's user) is left to registration, migrations and the command line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from sqlalchemy import URL, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, Pool

from dbcore import eventlog, leases, reference_catalog
from dbcore.catalog import CATALOG_SCHEMA, metadata, owned_tables, services
from dbcore.descriptor import LimitsDescriptor, ServiceDescriptor, role_for
from dbcore.isolation import CommitStatement, autocommit_connection, service_connection
from dbcore.logins import CORE_ROLE, core_role_sql, grant_login, password_for, read_secret
from dbcore.outbox import prepare_outbox
from dbcore.registry import REGISTRY_LOCK, Registration, ensure_group_role, register, sync_grants

__all__ = [
    "CATALOG_INSTALLED",
    "CATALOG_REVISION",
    "UNSTAMPED_REVISION",
    "Core",
    "PoolSize",
    "connection_budget",
    "lock_install",
]

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
CATALOG_REVISION = "0009_handoff"
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


@dataclass(frozen=True)
class PoolSize:
    """How many connections a login's pool keeps (``size``) and may open beyond (``overflow``)."""

    size: int
    overflow: int = 0


def _engine(
    url: str | URL,
    pool: PoolSize | None,
    application_name: str,
    *,
    pre_ping: bool = False,
    generic_plans: bool = False,
) -> AsyncEngine:
    settings = {"application_name": application_name}
    if generic_plans:
        settings["plan_cache_mode"] = "force_generic_plan"
    sized: dict[str, object] = (
        {"poolclass": NullPool}
        if pool is None
        else {"pool_size": pool.size, "max_overflow": pool.overflow, "pool_pre_ping": pre_ping}
    )
    return create_async_engine(
        url,
        # service_connection() sends BEGIN itself: SQLAlchemy must not.
        isolation_level="AUTOCOMMIT",
        connect_args={"server_settings": settings},
        **sized,
    )


_BUDGET = text(
    "SELECT current_setting('max_connections')::int"
    " - current_setting('superuser_reserved_connections')::int"
    " - coalesce(current_setting('reserved_connections', true)::int, 0)"
)


async def connection_budget(conn: AsyncConnection) -> int:
    """How many connections the server admits from roles without reserved slots."""
    return int((await conn.execute(_BUDGET)).scalar_one())


class Core:
    """A Postgres-backed core. Create with :meth:`connect`; close with :meth:`close`."""

    def __init__(self, engine: AsyncEngine) -> None:
        #: The administrator's pool: registration, migrations, commands.
        self.engine = engine
        self._table_owners: dict[str, str] = {}
        self._limits: dict[str, LimitsDescriptor] = {}
        self._secret: str | None = None
        self._service_pool: Callable[[str], PoolSize | None] | None = None
        self._core_engine: AsyncEngine | None = None
        self._service_engines: dict[str, AsyncEngine] = {}

    @classmethod
    def connect(cls, url: str, *, pool_size: int = 10, max_overflow: int = 10) -> Core:
        # The administrator's pool is used now and then (start-up, commands, dashboards): a
        # connection may have sat in it across a database restart, so it is checked before use.
        # The busy pools (services, core) learn of a restart from their first failed statement.
        return cls(_engine(url, PoolSize(pool_size, max_overflow), "vmsdb", pre_ping=True))

    async def close(self) -> None:
        for engine in (*self._service_engines.values(), self._core_engine):
            if engine is not None:
                await engine.dispose()
        self._service_engines.clear()
        self._core_engine = None
        await self.engine.dispose()

    # -- logins ------------------------------------------------------------------------------

    async def use_logins(
        self, *, core_pool: PoolSize | None, service_pool: Callable[[str], PoolSize | None]
    ) -> None:
        """From now on run each service's transactions, and the housekeeping, on connections
        logged in as their own roles (registration set the passwords; see ``dbcore.logins``).

        ``service_pool(service)``: the pool of a service's login, made on its first use
        (``None``: no pool, a connection per transaction).
        """
        async with self.admin() as conn:
            self._secret = await read_secret(conn)
        self._service_pool = service_pool
        # The core role's statements take arrays (a claim for several subscribers, outcome
        # lookups, renewals): planned for the arrays' contents, Postgres would plan them anew on
        # every call (about 0.5 ms each); their generic plans serve every call as well.
        self._core_engine = _engine(self.login_url(CORE_ROLE), core_pool, "vmsdb:core", generic_plans=True)

    def login_url(self, role: str) -> URL:
        """The URL that logs in as ``role`` (a service's or the core's) on this core."""
        if self._secret is None:
            raise RuntimeError("the core's logins are not in use (Core.use_logins)")
        url = self.engine.url
        return url.set(username=role, password=password_for(self._secret, role)).difference_update_query(
            ["user", "password"]
        )

    @property
    def core_engine(self) -> AsyncEngine:
        """The pool of the core role (the administrator's before :meth:`use_logins`)."""
        return self._core_engine if self._core_engine is not None else self.engine

    def service_engine(self, service: str) -> AsyncEngine:
        """The pool logged in as ``service``'s role (made on first use)."""
        engine = self._service_engines.get(service)
        if engine is None:
            if self._service_pool is None:
                raise RuntimeError("the core's logins are not in use (Core.use_logins)")
            url, pool = self.login_url(role_for(service)), self._service_pool(service)
            engine = _engine(url, pool, f"vmsdb:{service}")
            prepare_outbox(engine)  # its transactions send their outbox as EXECUTE
            self._service_engines[service] = engine
        return engine

    @property
    def logins(self) -> bool:
        """Whether services and housekeeping run on their own logins (:meth:`use_logins`)."""
        return self._service_pool is not None

    def pools(self) -> dict[str, Pool]:
        """Every pool of this process by login: ``admin``, ``core`` and each service in use."""
        found: dict[str, Pool] = {"admin": self.engine.pool}
        if self._core_engine is not None:
            found["core"] = self._core_engine.pool
        found.update((name, engine.pool) for name, engine in self._service_engines.items())
        return found

    # -- transactions ------------------------------------------------------------------------

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
    async def housekeeping(self, *, isolation: str = "read_committed") -> AsyncIterator[AsyncConnection]:
        """A transaction as the core role: the App's own chores (claims, retries, dead letters,
        pruning, publish, outcome lookups). The administrator before :meth:`use_logins`."""
        async with service_connection(self.core_engine, None, isolation=isolation) as conn:
            yield conn

    @asynccontextmanager
    async def housekeeping_autocommit(self) -> AsyncIterator[AsyncConnection]:
        """The core role outside a transaction (a claim is one statement)."""
        async with autocommit_connection(self.core_engine) as conn:
            yield conn

    def transaction(
        self,
        service: str,
        *,
        isolation: str = "read_committed",
        read_only: bool = False,
        connection: AsyncConnection | None = None,
        before_commit: CommitStatement | None = None,
    ) -> AbstractAsyncContextManager[AsyncConnection]:
        """A transaction of ``service``: on its own login (:meth:`use_logins`), else the
        administrator's connection with ``SET LOCAL ROLE`` (migrations, commands).

        ``connection``: on this (already checked out) connection rather than a pooled one;
        ``before_commit``: a statement sent together with ``COMMIT`` (see ``service_connection``).

        A read-only read-committed transaction on a service's login, with nothing to send at
        commit, opens no transaction at all: each of its statements sees its own snapshot
        either way, and the login is read-only by default (``dbcore.logins.grant_login``), so
        Postgres refuses a write as it would in ``BEGIN ... READ ONLY``. A one-statement read
        is then one round trip instead of three.
        """
        logged_in = self.logins
        reads_alone = (
            logged_in
            and read_only
            and isolation == "read_committed"
            and (before_commit is None or not before_commit.sql)
        )
        return service_connection(  # no context manager of its own: one fewer per transaction
            self.service_engine(service) if logged_in else self.engine,
            None if logged_in else role_for(service),
            isolation=isolation,
            read_only=read_only,
            connection=connection,
            before_commit=before_commit,
            begin=not reads_alone,
        )

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

    async def register(
        self, descriptors: Iterable[ServiceDescriptor], *, idle_timeout_ms: int | None = None
    ) -> list[Registration]:
        """Register descriptors in one transaction: all of them, or none.

        Also makes each service's role, and the core role, a login role with its password (see
        ``dbcore.logins``); ``idle_timeout_ms``: the services' sessions'
        ``idle_in_transaction_session_timeout`` (``None`` or 0: none).
        """
        descriptors = list(descriptors)
        async with self.admin() as conn:
            # Before the secret: the first start ever gives the group role its password, and
            # two processes doing that at once would collide on the role's catalog row.
            await conn.execute(REGISTRY_LOCK)
            secret = await read_secret(conn)
            result = [
                await register(
                    conn, d, password=password_for(secret, d.role), idle_timeout_ms=idle_timeout_ms
                )
                for d in descriptors
            ]
            await core_role_sql(conn)
            await grant_login(conn, CORE_ROLE, password_for(secret, CORE_ROLE))
        self._limits.update((d.name, d.limits) for d in descriptors)
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

    @property
    def limits(self) -> dict[str, LimitsDescriptor]:
        """The ``ServiceLimits`` of the services this core registered, for naming them in errors."""
        return self._limits

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
