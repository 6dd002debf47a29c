"""Running a transaction as a service, and reading Postgres's refusals back as ``IsolationError``.

Every transaction of a service runs under that service's role, so Postgres itself refuses a write
into another service's schema or a read of a table the owner did not export. In one process this
protects against mistakes: the framework's connection is the administrator, which switches role
per transaction, and code that issues ``RESET ROLE`` by hand could step out. Against hostile code
in another process, give each service its own login (``<role>`` with a password and ``LOGIN``) and
its own ``VMSDB_DATABASE_URL``: then no statement it can send reaches another service's tables.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Literal, Protocol

import sqlglot
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlglot import exp

from dbcore.catalog import quote_ident
from dbcore.errors import CoreError, IsolationError

__all__ = [
    "ISOLATION_LEVELS",
    "CommitStatement",
    "ReadOnlyViolation",
    "TransactionAborted",
    "TransactionConflict",
    "autocommit_connection",
    "is_retryable",
    "service_connection",
    "sqlstate_of",
    "translate_error",
]

Isolation = Literal["serializable", "snapshot", "read_committed"]

#: The framework's names for Postgres isolation levels; ``snapshot`` is REPEATABLE READ.
ISOLATION_LEVELS: Mapping[str, str] = {
    "serializable": "SERIALIZABLE",
    "snapshot": "REPEATABLE READ",
    "read_committed": "READ COMMITTED",
}

_SERIALIZATION_FAILURE = "40001"
_DEADLOCK_DETECTED = "40P01"
_INSUFFICIENT_PRIVILEGE = "42501"
_READ_ONLY_TRANSACTION = "25006"

# Postgres: "permission denied for table stock_items" / "... for schema stock" / "... for view v".
_DENIED = re.compile(r"permission denied for (table|schema|view|sequence|relation|function) (\S+)")
_WRITE_WORDS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "MERGE", "CREATE", "ALTER", "DROP")


class TransactionConflict(CoreError):
    """A serialization failure or deadlock; the transaction may succeed if run again."""


class ReadOnlyViolation(CoreError, PermissionError):
    """A statement tried to write inside a read-only (``RO``) transaction."""


def sqlstate_of(err: BaseException) -> str | None:
    """The SQLSTATE of a database error, whichever layer (SQLAlchemy, asyncpg) raised it."""
    orig = err.orig if isinstance(err, DBAPIError) else err
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_retryable(err: BaseException) -> bool:
    return sqlstate_of(err) in (_SERIALIZATION_FAILURE, _DEADLOCK_DETECTED)


def translate_error(
    err: BaseException,
    *,
    service: str,
    table_owners: Mapping[str, str],
    statement: str | None = None,
) -> BaseException | None:
    """Map a database error raised in ``service``'s transaction to a core error, or ``None``.

    ``table_owners`` maps both ``schema.table`` and bare ``table`` names to their owning service,
    so the error can name the service whose boundary was hit.
    """
    state = sqlstate_of(err)
    if state == _INSUFFICIENT_PRIVILEGE:
        message = str(err.orig if isinstance(err, DBAPIError) else err)
        match = _DENIED.search(message)
        table = match.group(2) if match else "(unknown object)"
        sql = statement or getattr(err, "statement", None) or ""
        owner = table_owners.get(table)
        if owner is not None and match and match.group(1) != "schema":
            table = f"{owner}.{table}"  # a service's schema is named after it
        if owner is None and match and match.group(1) in ("table", "view", "relation"):
            # Postgres names the table without its schema; the statement says which one it was.
            table, owner = _qualified_in_statement(sql, table, service, table_owners)
        if owner is None and match and match.group(1) == "schema":
            owner = table if table in table_owners.values() else None
        action = "write" if sql.lstrip().upper().startswith(_WRITE_WORDS) else "access"
        return IsolationError(service, owner, table, action)
    if state == _READ_ONLY_TRANSACTION:
        return ReadOnlyViolation(
            f"service {service!r} tried to write in a read-only (RO) transaction; "
            'declare the function @Transactional(type="RW") to let it write'
        )
    if state in (_SERIALIZATION_FAILURE, _DEADLOCK_DETECTED):
        return TransactionConflict(f"transaction of service {service!r} conflicted: {err}")
    from dbcore.references import translate as translate_reference  # references imports this module

    return translate_reference(err)


def _qualified_in_statement(
    sql: str, table: str, service: str, table_owners: Mapping[str, str]
) -> tuple[str, str | None]:
    """Find ``schema.table`` for a bare table name among the statement's table references."""
    try:
        tables = list(sqlglot.parse_one(sql, read="postgres").find_all(exp.Table))
    except sqlglot.errors.SqlglotError:
        return table, None
    for ref in tables:
        qualified = f"{ref.db}.{ref.name}"
        owner = table_owners.get(qualified)
        if ref.name == table and owner is not None and owner != service:
            return qualified, owner
    return table, None


class TransactionAborted(CoreError):
    """The transaction was already aborted when it came to commit (an error was swallowed)."""


@lru_cache(maxsize=256)
def _begin(role: str | None, isolation: str, read_only: bool) -> str:
    """BEGIN and SET LOCAL ROLE in one message: one round trip opens the service's transaction."""
    mode = "READ ONLY" if read_only else "READ WRITE"
    begin = f"BEGIN ISOLATION LEVEL {ISOLATION_LEVELS[isolation]} {mode}"
    return begin if role is None else f"{begin}; SET LOCAL ROLE {quote_ident(role)}"


def _autocommit_engine(engine: AsyncEngine) -> bool:
    return getattr(engine.sync_engine.dialect, "_on_connect_isolation_level", None) == "AUTOCOMMIT"


@asynccontextmanager
async def autocommit_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection outside any transaction, as the administrator: each statement
    commits on its own (one round trip, no ``BEGIN``/``COMMIT``)."""
    async with engine.connect() as conn:
        if not _autocommit_engine(engine):  # an engine not made by Core.connect
            await conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


class CommitStatement(Protocol):
    """A statement that travels in the same message as ``COMMIT`` (no round trip of its own).

    ``sql`` has its values inlined (a message of several statements uses the simple-query
    protocol, which takes no parameters). To stop the commit it must raise: an error ends the
    message, and the transaction is rolled back. ``translate`` turns its error into the
    exception the caller should see (``None``: not its error).
    """

    @property
    def sql(self) -> str: ...

    def translate(self, err: BaseException) -> BaseException | None: ...


@asynccontextmanager
async def service_connection(
    engine: AsyncEngine,
    role: str | None,
    *,
    isolation: str = "read_committed",
    read_only: bool = False,
    connection: AsyncConnection | None = None,
    before_commit: CommitStatement | None = None,
) -> AsyncIterator[AsyncConnection]:
    """A connection inside a transaction that runs as ``role`` (``None``: the administrator).

    The transaction commits when the block exits normally and rolls back on an exception.

    The transaction is opened by hand rather than by SQLAlchemy, so that ``BEGIN`` and
    ``SET LOCAL ROLE`` travel in one message (and ``before_commit`` with ``COMMIT``), and
    SQLAlchemy runs in autocommit mode inside it (it sends no BEGIN of its own). ``SET LOCAL``
    ends with the transaction, so a pooled connection never carries a service's role to its
    next user.

    ``connection``: run on this connection (checked out by the caller, which keeps it) instead
    of one from the pool.
    """
    if connection is not None:
        async with _transaction(connection, role, isolation, read_only, before_commit):
            yield connection
        return
    async with engine.connect() as conn:
        if not _autocommit_engine(engine):  # an engine not made by Core.connect
            await conn.execution_options(isolation_level="AUTOCOMMIT")
        async with _transaction(conn, role, isolation, read_only, before_commit):
            yield conn


@asynccontextmanager
async def _transaction(
    conn: AsyncConnection,
    role: str | None,
    isolation: str,
    read_only: bool,
    before_commit: CommitStatement | None,
) -> AsyncIterator[None]:
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    try:
        await raw.execute(_begin(role, isolation, read_only))
        yield
        # COMMIT of a transaction that an error aborted answers ROLLBACK instead of failing.
        commit = "COMMIT" if before_commit is None else f"{before_commit.sql}; COMMIT"
        status = await raw.execute(commit)
    except BaseException as err:
        try:
            # Harmless when no transaction is open any more (Postgres only warns).
            await raw.execute("ROLLBACK")
        except Exception:  # the connection broke (or a query was cut off): do not reuse it
            await conn.invalidate()
        translated = before_commit.translate(err) if before_commit is not None else None
        if translated is not None:
            raise translated from err
        raise
    if status != "COMMIT":
        raise TransactionAborted(
            "the transaction was aborted by an earlier error that was caught and ignored; "
            "nothing was committed"
        )
