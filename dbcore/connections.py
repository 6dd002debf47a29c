"""Checking a pooled connection out for a transaction, with its asyncpg connection at hand.

SQLAlchemy's ``async with engine.connect()``, then ``get_raw_connection()``, each run a greenlet,
and leaving the block closes the connection in a task of its own (so that a cancellation cannot
cut the close short): for a transaction that sends its ``BEGIN`` and ``COMMIT`` on the driver,
that was most of the Python the framework spent around a direct call's round trips. Here:

- the checkout and the driver connection come out of one greenlet;
- ``get_raw_connection()`` answers from what the checkout found, without a greenlet (the users'
  fast path, ``(await connection().get_raw_connection()).driver_connection``, included);
- the close runs in a greenlet of the caller's task when returning the connection to the pool
  cannot wait for anything (a pooled, valid connection going back into a pool that has room for
  it): nothing in it can be cancelled then. Otherwise (the pool closes it: an overflow connection,
  a pool without room, no pool at all, an invalidated connection) it is SQLAlchemy's own close,
  finished even if the caller is cancelled meanwhile.

What the connection is and does is SQLAlchemy's ``AsyncConnection``, unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection, QueuePool
from sqlalchemy.util import greenlet_spawn

__all__ = ["PooledConnection", "checked_out", "checkout", "release"]


class PooledConnection(AsyncConnection):
    """An ``AsyncConnection`` that knows its pooled DBAPI connection from the checkout."""

    __slots__ = ("_pooled",)

    def __init__(self, engine: AsyncEngine, sync: Connection, pooled: PoolProxiedConnection) -> None:
        super().__init__(engine, sync)
        self._pooled = pooled

    async def get_raw_connection(self) -> PoolProxiedConnection:
        sync = self.sync_connection
        if sync is None or sync.closed or sync.invalidated:  # SQLAlchemy's answer: an error, a reconnect
            return await super().get_raw_connection()
        return self._pooled


def _connect(engine: AsyncEngine) -> tuple[Connection, PoolProxiedConnection]:
    sync = engine.sync_engine.connect()
    try:
        return sync, sync.connection
    except BaseException:
        sync.close()
        raise


async def checkout(engine: AsyncEngine) -> PooledConnection:
    """A connection from ``engine``'s pool (given back by :func:`release`)."""
    sync, pooled = await greenlet_spawn(_connect, engine)
    return PooledConnection(engine, sync, pooled)


def _returns_without_waiting(conn: AsyncConnection) -> bool:
    """Whether closing ``conn`` only puts it back into its pool: no I/O, nothing to await.

    A QueuePool closes a returned connection when its queue is full (an overflow connection);
    an invalidated one, and any other pool, may close it too. Resetting a returned connection
    sends nothing on an ``AUTOCOMMIT`` connection that SQLAlchemy never began a transaction on
    (the asyncpg adapter's rollback is a no-op then), which is how ``service_connection`` runs.
    """
    sync = conn.sync_connection
    pool = conn.sync_engine.pool
    return (
        sync is not None
        and not sync.invalidated
        and isinstance(pool, QueuePool)
        and pool.checkedin() < pool.size()
    )


async def release(conn: AsyncConnection) -> None:
    """Give ``conn`` back to its pool (close it)."""
    sync = conn.sync_connection
    if sync is not None and _returns_without_waiting(conn):
        # Runs to its end without suspending (see above): a cancellation cannot cut it short.
        await greenlet_spawn(sync.close)
    else:
        await conn.__aexit__(None, None, None)  # SQLAlchemy's close, completed even if cancelled


@asynccontextmanager
async def checked_out(engine: AsyncEngine) -> AsyncIterator[PooledConnection]:
    """``async with engine.connect()``, with :func:`checkout` and :func:`release`."""
    conn = await checkout(engine)
    try:
        yield conn
    finally:
        await release(conn)
