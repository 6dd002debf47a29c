"""G11 and G12, Kafka ingress: plain JSON messages from outside producers reach ``@Inbound``
handlers once; malformed or undecodable ones go to the dead letters with their raw bytes, and
consumption goes on past them.
"""

from __future__ import annotations

import base64
import json

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from framework.testing.kafka import KafkaBroker

from .kafka_services import Signup, Tally, rows, seen, until


async def test_foreign_json_is_handled_once_and_bad_messages_are_dead_lettered(
    vmsdb_app_factory, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    topic = f"{vmsdb_kafka_topic_prefix}signups"
    options = {
        "kafka_bootstrap": vmsdb_kafka_broker.bootstrap,
        "kafka_topic_prefix": vmsdb_kafka_topic_prefix,
        "kafka_relay": False,
        "kafka_ingress": {topic: Signup},
        "kafka_session_timeout_ms": 1000,  # the test broker holds a group join for about half of it
    }
    messages = [
        json.dumps({"user": "u1", "plan": "pro"}).encode(),
        b'{"user": "u2", "plan": ',  # truncated JSON
        b"\xff\xfe\x00binary",  # not even UTF-8
        json.dumps({"user": "u3"}).encode(),  # JSON, but not a Signup
        json.dumps({"user": "u4", "plan": "free"}).encode(),  # after the bad ones: still handled
    ]
    await _produce(vmsdb_kafka_broker, topic, messages)  # the bad ones sit between the good ones

    async with vmsdb_app_factory([Tally], **options) as app:

        async def handled() -> bool:
            return len(await seen(app, "signup")) == 2

        await until(handled, "both valid signups to be handled")
        letters = await rows(app, "SELECT * FROM vms.dead_letters ORDER BY id")
        consumer = app._kafka.ingress._consumer
        tp = TopicPartition(topic, 0)
        await until(lambda: _committed(consumer, tp, 5), "the ingress to commit its offsets")

    assert [(r.source, r.subscriber, r.event_type, r.position, r.attempts) for r in letters] == [
        (f"kafka:{topic}/0/{offset}", "ktally", "Signup", None, 1) for offset in (1, 2, 3)
    ]
    assert letters[0].raw == '{"user": "u2", "plan": '
    assert "payload is not a valid Signup" in letters[0].error and "json" in letters[0].error.lower()
    assert base64.b64decode(letters[1].raw.removeprefix("base64:")) == b"\xff\xfe\x00binary"
    assert "plan" in letters[2].error and "Field required" in letters[2].error

    # Started again on the same database and group, it goes on from the committed offsets:
    # a new message is handled, and nothing before it is read (or dead-lettered) twice.
    async with vmsdb_app_factory([Tally], **options) as app:
        await _produce(vmsdb_kafka_broker, topic, [json.dumps({"user": "u5", "plan": "pro"}).encode()])

        async def third() -> bool:
            return len(await seen(app, "signup")) == 3

        await until(third, "the signup sent after the restart to be handled")
        await app.drain()
        assert sorted(k for _, k, _ in await seen(app, "signup")) == ["u1", "u4", "u5"]
        assert len(await rows(app, "SELECT id FROM vms.dead_letters")) == 3
        assert app._kafka.ingress.dead_letters == 0


async def _produce(broker: KafkaBroker, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:  # one partition, so their order is kept
            await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()


async def _committed(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> bool:
    return bool(await consumer.committed(tp) == offset)
