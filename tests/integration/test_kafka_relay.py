"""G11, the outbox relay: committed events reach Kafka in per-key order, with their identity in
headers; nothing rolled back is published; a late commit is never skipped; a broker that stops
answering stalls the relay without losing or reordering anything.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from dbcore import relay as relay_log
from framework import App, correlate
from framework.testing.kafka import KafkaBroker

from .kafka_services import Placed, Shop, Tally, headers, read_topic, rows, until


def kafka(broker: KafkaBroker, prefix: str, **options: object) -> dict[str, object]:
    return {"kafka_bootstrap": broker.bootstrap, "kafka_topic_prefix": prefix, **options}


async def backlog(app: App) -> int:
    async with app.core.admin() as conn:
        return await relay_log.backlog(conn, "kafka")


async def published(app: App) -> bool:
    return await backlog(app) == 0


async def test_committed_events_reach_kafka_in_key_order_with_headers(
    vmsdb_app_factory, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    async with vmsdb_app_factory([Shop, Tally], **kafka(vmsdb_kafka_broker, vmsdb_kafka_topic_prefix)) as app:
        shop = app.service(Shop)

        async def in_order(key: str) -> None:
            for seq in range(10):
                with correlate(f"tid-{key}"):
                    await shop.place(key, seq)

        await asyncio.gather(*(in_order(f"k{i}") for i in range(5)))
        await app.drain()
        placed = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 50)
        tallied = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Tallied", 50)
        log_rows = {
            str(r.id): r
            for r in await rows(
                app,
                "SELECT id, type, producer, correlation_id, causation_id, xid::text AS xid, position "
                "FROM vms.events",
            )
        }

    assert len(placed) == 50  # each exactly once: no failure, so no retry duplicates
    by_key: dict[str, list[int]] = {}
    for m in placed:
        ev = Placed.model_validate_json(m.value)
        assert m.key == ev.key.encode()
        by_key.setdefault(ev.key, []).append(ev.seq)
        h = headers(m)
        row = log_rows[h["vmsdb-event-id"]]
        assert h["vmsdb-event-type"] == "Placed" == row.type
        assert h["vmsdb-producer"] == "kshop"
        assert h["vmsdb-correlation-id"] == f"tid-{ev.key}"
        assert "vmsdb-causation-id" not in h
        assert (h["vmsdb-xid"], int(h["vmsdb-position"])) == (row.xid, row.position)
    assert by_key == {f"k{i}": list(range(10)) for i in range(5)}  # FIFO per key
    # An event sent by a handler names its cause and keeps the correlation.
    for m in tallied:
        h = headers(m)
        cause = log_rows[h["vmsdb-causation-id"]]
        assert cause.type == "Placed" and h["vmsdb-producer"] == "ktally"
        assert h["vmsdb-correlation-id"] == cause.correlation_id


async def test_rolled_back_transaction_publishes_nothing(
    vmsdb_app_factory, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    async with vmsdb_app_factory([Shop], **kafka(vmsdb_kafka_broker, vmsdb_kafka_topic_prefix)) as app:
        shop = app.service(Shop)
        with pytest.raises(RuntimeError, match="the shop failed"):
            await shop.place("k", 1, fail=True)
        await shop.place("k", 2)
        await until(lambda: published(app), "the relay to publish")
        placed = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 1)
        await asyncio.sleep(0.3)  # anything else would have been published with, or before, it
        placed = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 1)
    assert [Placed.model_validate_json(m.value).seq for m in placed] == [2]


async def test_late_commit_is_published_first_and_nothing_skipped(
    vmsdb_app_factory, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    async with vmsdb_app_factory([Shop], **kafka(vmsdb_kafka_broker, vmsdb_kafka_topic_prefix)) as app:
        shop = app.service(Shop)
        # The long transaction takes its id first and commits last; later ones commit meanwhile.
        long = asyncio.create_task(shop.place("shared", 0, hold=0.6))
        await asyncio.sleep(0.1)
        for seq in range(1, 6):
            await shop.place("shared", seq)
        await asyncio.gather(*(shop.place(f"solo-{i}", i) for i in range(10)))
        # While it is open, the relay publishes nothing after it (the horizon holds).
        assert await backlog(app) == 15
        await long
        placed = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 16)
    events = [Placed.model_validate_json(m.value) for m in placed]
    assert len(events) == 16
    assert [e.seq for e in events if e.key == "shared"] == [0, 1, 2, 3, 4, 5]


async def test_paused_broker_stalls_the_relay_and_loses_nothing(
    vmsdb_app_factory,
    vmsdb_kafka_broker: KafkaBroker,
    vmsdb_kafka_topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vmsdb.kafka")
    options = kafka(vmsdb_kafka_broker, vmsdb_kafka_topic_prefix, kafka_stall_warning=0.5)
    async with vmsdb_app_factory([Shop], **options) as app:
        shop = app.service(Shop)
        for seq in range(5):
            await shop.place("k", seq)
        await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 5)
        with vmsdb_kafka_broker.paused():
            for seq in range(5, 45):
                await shop.place(f"k{seq % 3}", seq)
            await asyncio.sleep(1.5)
            # Sent, never acknowledged: the cursor has not moved past any of them.
            assert await backlog(app) == 40
        await until(lambda: published(app), "the relay to catch up after the broker resumed")
        placed = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 45)
    seqs: dict[str, list[int]] = {}
    for m in placed:
        ev = Placed.model_validate_json(m.value)
        seqs.setdefault(ev.key, []).append(ev.seq)
    assert seqs == {
        "k": [0, 1, 2, 3, 4],
        **{f"k{r}": [s for s in range(5, 45) if s % 3 == r] for r in range(3)},
    }
    relay_logs = [r.getMessage() for r in caplog.records if r.name == "vmsdb.kafka.relay"]
    stalls = [m for m in relay_logs if "no acknowledgement" in m]
    recoveries = [m for m in relay_logs if "recovered" in m]
    assert len(stalls) == 1 and len(recoveries) == 1, relay_logs


async def test_ingested_events_are_not_relayed_back(
    vmsdb_app_factory, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    async with vmsdb_app_factory([Shop], **kafka(vmsdb_kafka_broker, vmsdb_kafka_topic_prefix)) as app:
        async with app.core.admin() as conn:
            from dbcore.eventlog import EventRecord, append

            foreign = EventRecord(
                id=uuid.uuid4(),
                type="Placed",
                key="x",
                payload='{"key": "x", "seq": 99}',
                producer=None,
                origin="kafka:elsewhere",
            )
            await append(conn, [foreign], deduplicate=True)
        await app.service(Shop).place("x", 1)
        await until(lambda: published(app), "the relay to publish")
        placed = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 1)
        await asyncio.sleep(0.2)
        placed = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 1)
        cursor = await rows(app, "SELECT position FROM vms.relay_cursors WHERE name = 'kafka'")
        last = await rows(app, "SELECT max(position) AS p FROM vms.events")
    assert [Placed.model_validate_json(m.value).seq for m in placed] == [1]
    assert cursor[0].position == last[0].p  # passed over, so retention can prune it
