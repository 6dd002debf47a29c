"""Running a transaction as a service (Postgres's refusals become core errors in ``translate.py``).

Every transaction of a service runs under that service's role, so Postgres itself refuses a write
into another service's schema or a read of a table the owner did not export. In a started App the
connection is *logged in* as that role (``Core.use_logins``, ``dbcore.logins``): ``role`` is then
``None`` and there is no role to switch back to. ``role`` names one only for the administrator's
own work on a service's behalf (migrations, commands), where ``SET LOCAL ROLE`` ends with the
transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Literal, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dbcore.catalog import quote_ident
from dbcore.connections import checked_out, checkout, release
from dbcore.errors import ReadOnlyViolation, TransactionAborted, TransactionConflict

__all__ = [
    "ISOLATION_LEVELS",
    "CommitStatement",
    "ReadOnlyViolation",
    "TransactionAborted",
    "TransactionConflict",
    "autocommit_connection",
    "service_connection",
]

Isolation = Literal["serializable", "snapshot", "read_committed"]

#: The framework's names for Postgres isolation levels; ``snapshot`` is REPEATABLE READ.
ISOLATION_LEVELS: Mapping[str, str] = {
    "serializable": "SERIALIZABLE",
    "snapshot": "REPEATABLE READ",
    "read_committed": "READ COMMITTED",
}


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
    async with checked_out(engine) as conn:
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
    begin: bool = True,
) -> AsyncIterator[AsyncConnection]:
    """A connection inside a transaction that runs as ``role`` (``None``: whoever the engine
    logs in as: a service's or the core's login role, or the administrator).

    ``begin=False``: no transaction at all, each statement on its own (no ``BEGIN``, no
    ``COMMIT``: the round trips of a read-only read-committed call whose login is read-only
    by default; see ``Core.transaction``). ``before_commit`` is then run on its own at the end
    (a write there is refused like any other).

    The transaction commits when the block exits normally and rolls back on an exception.

    The transaction is opened by hand rather than by SQLAlchemy, so that ``BEGIN`` and
    ``SET LOCAL ROLE`` travel in one message (and ``before_commit`` with ``COMMIT``), and
    SQLAlchemy runs in autocommit mode inside it (it sends no BEGIN of its own). ``SET LOCAL``
    ends with the transaction, so a pooled connection never carries a service's role to its
    next user.

    ``connection``: run on this connection (checked out by the caller, which keeps it) instead
    of one from the pool.
    """
    run = _transaction if begin else _statements
    if connection is not None:
        async with run(connection, role, isolation, read_only, before_commit):
            yield connection
        return
    conn = await checkout(engine)
    try:
        if not _autocommit_engine(engine):  # an engine not made by Core.connect
            await conn.execution_options(isolation_level="AUTOCOMMIT")
        async with run(conn, role, isolation, read_only, before_commit):
            yield conn
    finally:
        await release(conn)


@asynccontextmanager
async def _statements(
    conn: AsyncConnection,
    role: str | None,
    isolation: str,
    read_only: bool,
    before_commit: CommitStatement | None,
) -> AsyncIterator[None]:
    """Statements each in its own implicit transaction (``service_connection(begin=False)``)."""
    assert role is None and read_only and isolation == "read_committed", "only reads run alone"
    yield
    sent_with = "" if before_commit is None else before_commit.sql
    if sent_with:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        try:
            await raw.execute(sent_with)
        except BaseException as err:
            _raise_translated(before_commit, err)
            raise


def _raise_translated(before_commit: CommitStatement | None, err: BaseException) -> None:
    """Raise ``before_commit``'s own exception for ``err``, if it has one."""
    translated = before_commit.translate(err) if before_commit is not None else None
    if translated is not None:
        raise translated from err


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
        sent_with = "" if before_commit is None else before_commit.sql
        commit = f"{sent_with}; COMMIT" if sent_with else "COMMIT"
        status = await raw.execute(commit)
    except BaseException as err:
        try:
            # Harmless when no transaction is open any more (Postgres only warns).
            await raw.execute("ROLLBACK")
        except Exception:  # the connection broke (or a query was cut off): do not reuse it
            await conn.invalidate()
        _raise_translated(before_commit, err)
        raise
    if status != "COMMIT":
        raise TransactionAborted(
            "the transaction was aborted by an earlier error that was caught and ignored; "
            "nothing was committed"
        )
