"""The pytest plugin of vmsdb (registered as ``vmsdb`` through the ``pytest11`` entry point).

The fixtures are described in :mod:`framework.testing`; each name starts with ``vmsdb_``.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from framework._internal.app import App
from framework._internal.service import Service
from framework.testing import fresh_database, postgres_server
from framework.testing.kafka import KafkaBroker, start_broker

__all__ = [
    "AppFactory",
    "vmsdb_app",
    "vmsdb_app_factory",
    "vmsdb_database",
    "vmsdb_kafka_broker",
    "vmsdb_kafka_topic_prefix",
    "vmsdb_server",
    "vmsdb_services",
    "vmsdb_spans",
]

_topics = itertools.count()


@pytest.fixture(scope="session")
def vmsdb_server() -> Iterator[str]:
    """Admin URL (asyncpg) of the Postgres server tests run against."""
    with postgres_server() as url:
        yield url


@pytest_asyncio.fixture
async def vmsdb_database(vmsdb_server: str) -> AsyncIterator[str]:
    async with fresh_database(vmsdb_server) as url:
        yield url


@pytest.fixture
def vmsdb_services() -> Sequence[type[Service]]:
    raise pytest.UsageError(
        "the `vmsdb_app` fixture needs to know which services to start: define a fixture "
        "`vmsdb_services` returning the service classes (in the test module or a conftest.py)"
    )


AppFactory = Callable[..., AbstractAsyncContextManager[App]]


@pytest_asyncio.fixture
async def vmsdb_app_factory(vmsdb_database: str) -> AppFactory:
    """``async with vmsdb_app_factory(services, **options) as app`` on this test's database."""

    @asynccontextmanager
    async def factory(services: Sequence[type[Service]], **options: Any) -> AsyncIterator[App]:
        options.setdefault("create_tables", True)
        options.setdefault("database_url", vmsdb_database)
        async with App(services, **options) as started:
            yield started

    return factory


@pytest_asyncio.fixture
async def vmsdb_app(
    vmsdb_app_factory: AppFactory, vmsdb_services: Sequence[type[Service]]
) -> AsyncIterator[App]:
    async with vmsdb_app_factory(vmsdb_services) as started:
        yield started


@pytest.fixture(scope="session")
def vmsdb_kafka_broker() -> Iterator[KafkaBroker]:
    """A Kafka-protocol broker for the whole test run (fails, never skips, if it cannot start)."""
    with tempfile.TemporaryDirectory(prefix="vmsdb-kafka-") as tmp:
        broker = start_broker(Path(tmp))
        try:
            yield broker
        finally:
            broker.stop()


@pytest.fixture
def vmsdb_kafka_topic_prefix() -> str:
    """A topic prefix unique to this test, so tests sharing the broker never see each other."""
    return f"t{os.getpid()}-{next(_topics)}."


@pytest.fixture
def vmsdb_spans() -> Iterator[Any]:
    """Tracing on for this test, into an OpenTelemetry ``InMemorySpanExporter`` (yielded): its
    ``get_finished_spans()`` are the spans the framework made. Needs ``vmsdb[otel]``. Ask for
    it before the App (or the FastAPI application) so that they are traced from the start."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from framework._internal.telemetry import tracing_with

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracing_with(provider):
        yield memory
    provider.shutdown()
