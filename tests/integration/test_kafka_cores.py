"""G11 across two cores: a producer service on core A (relay on), its consumer on core B
(``kafka_remote``), each core its own database. Effects exactly once, FIFO per key, precedence
held, and nothing ingested on B is published back.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally_
from typing import Any

from aiokafka import AIOKafkaProducer

from dbcore import relay as relay_log
from framework import App
from framework.testing import fresh_database
from framework.testing.kafka import KafkaBroker

from .kafka_services import Shop, Tally, read_topic, rows, seen, until


async def published(app: App) -> bool:
    async with app.core.admin() as conn:
        return await relay_log.backlog(conn, "kafka") == 0


async def place(app: App, first: int, count: int) -> None:
    """``count`` Placed over six keys, committed one after another."""
    shop = app.service(Shop)
    for seq in range(first, first + count):
        await shop.place(f"k{seq % 6}", seq)


async def republish(bootstrap: str, messages: list[Any]) -> None:
    """Send copies of relayed messages (same key, value and headers): Kafka now holds duplicates."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for m in messages:
            await producer.send_and_wait(m.topic, m.value, key=m.key, headers=list(m.headers))
    finally:
        await producer.stop()


async def test_two_cores_effects_once_in_order_with_precedence(
    vmsdb_app_factory, vmsdb_server: str, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    kafka = {"kafka_bootstrap": vmsdb_kafka_broker.bootstrap, "kafka_topic_prefix": vmsdb_kafka_topic_prefix}
    # Small ingress rounds (7 messages): the Flagged comes in while earlier Placed still wait.
    consumer_options = {
        **kafka,
        "kafka_remote": ["ktally"],
        "kafka_session_timeout_ms": 1000,
        "kafka_batch_size": 7,
    }
    async with vmsdb_app_factory([Shop], **kafka) as core_a:
        # A backlog in Kafka before the consumer's core exists: 60 Placed, a Flagged, 20 Placed.
        await place(core_a, 0, 60)
        await core_a.service(Shop).flag("f", 1)
        await place(core_a, 60, 20)
        await until(lambda: published(core_a), "core A's relay to publish the backlog")
        copies = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 80)
        await republish(vmsdb_kafka_broker.bootstrap, copies[::7])

        async with (
            fresh_database(vmsdb_server) as url_b,
            vmsdb_app_factory([Tally], database_url=url_b, **consumer_options) as core_b,
        ):

            async def handled(placed: int, flagged: int) -> bool:
                return (
                    len(await seen(core_b, "placed")) >= placed
                    and len(await seen(core_b, "flagged")) >= flagged
                )

            await until(lambda: handled(80, 1), "core B to handle the backlog")
            # Now live: both cores running.
            await place(core_a, 80, 30)
            await core_a.service(Shop).flag("f", 2)
            await place(core_a, 110, 10)
            await until(lambda: handled(120, 2), "core B to handle the live events")
            await core_b.drain()
            await asyncio.sleep(0.3)  # duplicates still in flight would show up by now
            await core_b.drain()

            placed = await seen(core_b, "placed")
            flagged = await seen(core_b, "flagged")
            counters = dict((r.id, r.n) for r in await rows(core_b, "SELECT id, n FROM ktally.counters"))
            origins = await rows(core_b, "SELECT type, origin FROM vms.events ORDER BY xid, position")
            relay_b = core_b._kafka.relay
            assert await published(core_b)

    # Exactly once: every Placed handled once, duplicates in Kafka included.
    assert len(placed) == 120 and len({e for e, _, _ in placed}) == 120
    assert counters == dict(Tally_(f"k{s % 6}" for s in range(120)))
    # FIFO per key.
    for k in range(6):
        assert [s for _, key, s in placed if key == f"k{k}"] == list(range(k, 120, 6))
    # Precedence: each Flagged was handled after every Placed committed before it.
    assert [(key, count >= need) for (_, key, count), need in zip(flagged, (60, 110), strict=True)] == [
        ("f", True),
        ("f", True),
    ]
    # Ingested events came from Kafka and were not published again; B published its own.
    assert {(t, o) for t, o in origins if o is None} == {("Tallied", None)}
    assert {o for t, o in origins if t == "Placed"} == {f"kafka:{vmsdb_kafka_topic_prefix}Placed"}
    assert relay_b.published >= 120
