"""Log records carry the trace id, the correlation id and the event id of what they are about."""

from __future__ import annotations

import logging
import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from framework import correlate
from framework._internal import telemetry
from framework.testing.plugin import AppFactory
from tests.integration.observed_services import Receiver, Sender


@pytest.mark.parametrize("tracing", [False, True], ids=["tracing-off", "tracing-on"])
async def test_a_handlers_retry_is_logged_with_its_event_correlation_and_trace(
    vmsdb_app_factory: AppFactory, caplog: pytest.LogCaptureFixture, tracing: bool
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    caplog.set_level(logging.WARNING, logger="vmsdb.delivery")
    with telemetry.tracing_with(provider) if tracing else _nothing():
        async with vmsdb_app_factory([Sender, Receiver]) as app:
            with correlate("c-log"):
                await app.service(Sender).send_parcel("p", poison=True)
            await app.drain(timeout=60)
            async with app.core.admin() as conn:
                event_id, trace_context = (
                    await conn.execute(text("SELECT id, trace_context FROM vms.events"))
                ).one()
    (retry,) = [r for r in caplog.records if "retrying" in r.getMessage()]
    (dead,) = [r for r in caplog.records if "dead letters" in r.getMessage()]
    for record in (retry, dead):
        assert record.event_id == str(event_id)  # type: ignore[attr-defined]
        assert record.correlation_id == "c-log"  # type: ignore[attr-defined]
        if tracing:
            assert record.trace_id == trace_context.split("-")[1]  # type: ignore[attr-defined]
            assert uuid.UUID(int=int(record.trace_id, 16))  # type: ignore[attr-defined]
        else:
            assert trace_context is None and record.trace_id == ""  # type: ignore[attr-defined]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
