"""One eShop checkout is one trace: the HTTP request's span, then every handler's span a child of
the span that sent its event (read back from the W3C trace context stored in the log)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import text

from tests.e2e.conftest import Eshop


@pytest.fixture
async def traced_eshop(vmsdb_spans: InMemorySpanExporter, eshop: Eshop) -> AsyncIterator[Eshop]:
    yield eshop


def parse(traceparent: str) -> tuple[int, int]:
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def test_a_checkout_is_one_trace_with_every_hop_a_child_of_its_sender(
    vmsdb_spans: InMemorySpanExporter, traced_eshop: Eshop
) -> None:
    eshop = traced_eshop
    await eshop.add(1, 1, 1, 2)
    await eshop.add(1, 2, 3, 1)
    vmsdb_spans.clear()
    assert (await eshop.checkout(1, "t-traced")).status_code == 200
    await eshop.app.drain()
    spans: list[ReadableSpan] = list(vmsdb_spans.get_finished_spans())

    (request,) = [s for s in spans if s.kind == SpanKind.SERVER and "checkout" in s.name]
    trace_id = request.context.trace_id
    by_id = {s.context.span_id: s for s in spans}
    async with eshop.app.core.admin() as conn:
        events = (
            await conn.execute(
                text(
                    "SELECT id, type, producer, trace_context FROM vms.events "
                    "WHERE correlation_id = 't-traced' ORDER BY xid, position"
                )
            )
        ).all()
        grouped = text("SELECT event_type, array_agg(service) AS services FROM vms.subscriptions GROUP BY 1")
        subscribers = {r.event_type: r.services for r in await conn.execute(grouped)}
    assert len(events) >= 6

    handlers: dict[tuple[str, str], Any] = {
        (s.attributes["vmsdb.event_id"], s.attributes["vmsdb.service"]): s
        for s in spans
        if s.attributes is not None and "vmsdb.event_id" in s.attributes
    }
    hops = 0
    for event in events:
        sent_in, sender_span = parse(event.trace_context)
        assert sent_in == trace_id, f"{event.type} was sent outside the checkout's trace"
        assert sender_span in by_id, f"{event.type}'s sender span was not exported"
        if event.producer is None:
            assert sender_span == request.context.span_id  # published by the HTTP route
        for service in subscribers.get(event.type, []):
            handler = handlers[(str(event.id), service)]
            assert handler.context.trace_id == trace_id
            assert handler.parent is not None and handler.parent.span_id == sender_span
            assert handler.kind == SpanKind.CONSUMER
            assert handler.attributes["vmsdb.outcome"] == "handled"
            assert handler.attributes["vmsdb.event_type"] == event.type
            hops += 1
    services = {service for _, service in handlers}
    assert {"cart", "stock", "order", "payment", "seller", "customer", "shipment"} <= services
    assert hops >= 10
    # Inside a handler, what it calls (the order's @Query, the stock's lease consume) are children.
    handler_ids = {h.context.span_id for h in handlers.values()}
    inner = [s for s in spans if s.attributes and s.attributes.get("vmsdb.kind") == "query"]
    inner += [s for s in spans if s.name == "lease consume"]
    assert {s.attributes.get("vmsdb.kind") for s in inner} == {"query", None}
    for span in inner:
        assert span.parent is not None and span.parent.span_id in handler_ids, span.name
