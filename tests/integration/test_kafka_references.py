"""G9/G10 across cores over Kafka: the reference protocol's events travel through the relay and
the ingress, with nothing carried by hand. Core A owns a referenceable entity, core B (its own
database) holds a reference to it; both run the Kafka transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from framework import App
from framework.references import backup, check, crash, restore, uri_of
from framework.testing import fresh_database
from framework.testing.kafka import KafkaBroker

from .kafka_services import read_topic, rows, until
from .test_kafka_cores import republish
from .test_references_cross_core import Archive, Fellow, Guild, held


@pytest.fixture
async def cores(
    vmsdb_server: str, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[App, App]]:
    kafka = {"kafka_bootstrap": vmsdb_kafka_broker.bootstrap, "kafka_topic_prefix": vmsdb_kafka_topic_prefix}
    async with fresh_database(vmsdb_server) as url_a, fresh_database(vmsdb_server) as url_b:
        core_a = App([Guild], database_url=url_a, create_tables=True, data_dir=tmp_path, **kafka)
        core_b = App([Archive], database_url=url_b, create_tables=True, data_dir=tmp_path, **kafka)
        async with core_a, core_b:
            yield core_a, core_b


async def granted(core_b: App, rid: str) -> bool:
    return await core_b.service(Archive).fellow_of(rid) is not None


async def test_a_reference_is_granted_and_given_back_across_cores_through_kafka(
    cores: tuple[App, App], vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    core_a, core_b = cores
    uri = uri_of(Fellow, "f1")
    await core_a.service(Guild).put("f1", "Ada")
    await core_b.service(Archive).file("r1", "f1")
    await until(lambda: granted(core_b, "r1"), "core A's grant to reach core B")
    ref = await core_b.service(Archive).fellow_of("r1")
    assert ref is not None and (ref.uri, ref.t, ref.copy) == (uri, 1, {"id": "f1", "name": "Ada"})
    assert await held(core_a, uri) == (1, {"archive": 1})

    # Kafka delivers the request again: core A has it already, so it counts once.
    copies = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}vms.ref.acquire", 1)
    await republish(vmsdb_kafka_broker.bootstrap, copies)
    await core_b.service(Archive).file("r2", "f1")  # a later request, to know the copy was read
    await until(lambda: granted(core_b, "r2"), "the second grant")
    assert await held(core_a, uri) == (2, {"archive": 2})

    await core_b.service(Archive).unfile("r1")
    await core_b.service(Archive).unfile("r2")

    async def released() -> bool:
        return await held(core_a, uri) == (0, {})

    await until(released, "core B's releases to reach core A")
    assert (await check(core_a)).globally_consistent and (await check(core_b)).globally_consistent


async def test_a_restore_hears_from_a_holder_on_another_core_through_kafka(cores: tuple[App, App]) -> None:
    """The amnesia announcement goes out through core A's relay, core B answers through its
    own, and the restore in consistency mode merges B's newer copy of the lost row."""
    core_a, core_b = cores
    guild, archive = core_a.service(Guild), core_b.service(Archive)
    await guild.put("f1", "Ada")
    await archive.file("r1", "f1")
    await until(lambda: granted(core_b, "r1"), "the grant")
    await backup(core_a, "guild")  # counts archive's reference: the restore expects its answer
    await guild.put("f1", "Ada Lovelace")  # t=2, lost with the crash ...
    await archive.refresh("r1")

    async def refreshed() -> bool:
        ref = await archive.fellow_of("r1")
        return ref is not None and ref.t == 2

    await until(refreshed, "the refresh")  # ... but archive's copy has it
    await crash(core_a, "guild")
    state = await restore(core_a, "guild", mode="consistency", timeout=20)
    assert (state.status, state.answered, state.merged) == (
        "completed",
        ("archive",),
        (uri_of(Fellow, "f1"),),
    )
    [(name,)] = await rows(core_a, "SELECT name FROM guild.fellows WHERE id = 'f1'")
    assert name == "Ada Lovelace"
    assert (await check(core_a)).globally_consistent


async def test_malformed_protocol_messages_are_dead_letters_and_the_rest_flows(
    cores: tuple[App, App], vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    core_a, core_b = cores
    await core_a.service(Guild).put("f1", "Ada")
    topic = f"{vmsdb_kafka_topic_prefix}vms.ref.acquire"
    producer = AIOKafkaProducer(bootstrap_servers=vmsdb_kafka_broker.bootstrap, acks="all")
    await producer.start()
    try:
        for event_id, value in (
            (b"9b0cf7a4-3d2e-4c55-8a43-6f0a3b8f8e01", b"[1, 2]"),  # not a JSON object
            (b"9b0cf7a4-3d2e-4c55-8a43-6f0a3b8f8e02", b'{"uri": "vms://guild/fellows/f1"}'),  # no holder
        ):
            headers = [("vmsdb-event-id", event_id), ("vmsdb-event-type", b"vms.ref.acquire")]
            await producer.send_and_wait(topic, value, key=b"k", headers=headers)
    finally:
        await producer.stop()
    # A real request after them: the ingress went on.
    await core_b.service(Archive).file("r1", "f1")
    await until(lambda: granted(core_b, "r1"), "the grant after the malformed messages")

    letters = await rows(
        core_a, "SELECT event_type, raw, error FROM vms.dead_letters WHERE subscriber = 'vms' ORDER BY id"
    )
    assert [(t, raw) for t, raw, _ in letters] == [
        ("vms.ref.acquire", "[1, 2]"),
        ("vms.ref.acquire", '{"uri": "vms://guild/fellows/f1"}'),
    ]
    assert "must hold a JSON object" in letters[0][2]
    assert "could not be applied: KeyError: 'holder'" in letters[1][2]
    assert await held(core_a, uri_of(Fellow, "f1")) == (1, {"archive": 1})
