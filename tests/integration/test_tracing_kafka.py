"""A hop through Kafka between two cores stays in its trace: the consumer core's handler span is
a child of the producer core's span, through the ``traceparent`` header."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from framework._internal.scrape import exposition
from framework.testing import fresh_database
from framework.testing.kafka import KafkaBroker

from .kafka_services import Shop, Tally, read_topic, seen, until


async def test_the_consumer_cores_handler_is_a_child_of_the_producer_cores_span(
    vmsdb_spans: InMemorySpanExporter,
    vmsdb_app_factory,
    vmsdb_server: str,
    vmsdb_kafka_broker: KafkaBroker,
    vmsdb_kafka_topic_prefix: str,
) -> None:
    kafka = {"kafka_bootstrap": vmsdb_kafka_broker.bootstrap, "kafka_topic_prefix": vmsdb_kafka_topic_prefix}
    async with (
        vmsdb_app_factory([Shop], **kafka) as core_a,
        fresh_database(vmsdb_server) as url_b,
        vmsdb_app_factory(
            [Tally], database_url=url_b, kafka_remote=["ktally"], kafka_session_timeout_ms=1000, **kafka
        ) as core_b,
    ):
        await core_a.service(Shop).place("k1", 1)
        await until(lambda: _handled(core_b), "core B to handle the Placed")
        (message,) = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 1)
        await core_b.drain()
        # The hop in the metrics: published by A's relay, inserted and committed by B's ingress.
        await until(lambda: _committed(core_b), "core B's ingress to commit its offset")
        relayed = (await exposition(core_a)).decode()
        ingested = (await exposition(core_b)).decode()
    assert "vmsdb_relay_published_total 1.0" in relayed
    assert 'vmsdb_relay_lag_seconds{relay="kafka"} 0.0' in relayed
    assert "vmsdb_ingress_events_total 1.0" in ingested
    placed = f'topic="{vmsdb_kafka_topic_prefix}Placed"'
    assert any(
        placed in line and line.endswith(" 1.0")
        for line in ingested.splitlines()
        if line.startswith("vmsdb_ingress_committed_offset")
    ), ingested

    spans = list(vmsdb_spans.get_finished_spans())
    (place,) = [s for s in spans if s.name == "kshop.place"]
    (handler,) = [s for s in spans if s.name == "ktally handle Placed"]
    assert handler.context.trace_id == place.context.trace_id
    assert handler.parent is not None and handler.parent.span_id == place.context.span_id
    assert handler.kind == SpanKind.CONSUMER
    assert handler.attributes is not None and handler.attributes["vmsdb.service"] == "ktally"
    # The header that carried it across, W3C's own.
    headers = dict(message.headers)
    assert headers["traceparent"].decode() == (
        f"00-{place.context.trace_id:032x}-{place.context.span_id:016x}-{int(place.context.trace_flags):02x}"
    )
    # The batch spans of the hop link back to the sender.
    for name in ("vmsdb relay publish", "vmsdb ingress insert"):
        batch = next(s for s in spans if s.name == name)
        assert any(link.context.span_id == place.context.span_id for link in batch.links), name


async def _committed(core_b) -> bool:
    return bool(core_b.kafka.ingress.committed)


async def _handled(core_b) -> bool:
    return len(await seen(core_b, "placed")) >= 1
