"""G11 through crashes: a relay killed (kill -9) with a batch sent but not acknowledged, and a
relay that dies while a standby waits. Relays run in subprocesses
(``tests/integration/kafka_relay_worker.py``); the consumer is another core (``kafka_remote``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dbcore import relay as relay_log
from framework import App
from framework.testing import fresh_database
from framework.testing.kafka import KafkaBroker

from .kafka_services import WAIT, Shop, Tally, headers, read_topic, rows, seen, until

ROOT = Path(__file__).resolve().parents[2]


class RelayProcess:
    def __init__(self, name: str, proc: asyncio.subprocess.Process, out: Path, err: Path) -> None:
        self.name = name
        self.proc = proc
        self.out = out
        self.err = err

    def said(self, line: str) -> bool:
        return line in self.out.read_text().splitlines()

    async def wait_for(self, line: str, timeout: float = WAIT) -> None:
        async def check() -> bool:
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"relay {self.name} exited with {self.proc.returncode}:\n"
                    + self.err.read_text(errors="replace")
                )
            return self.said(line)

        await until(check, f"relay {self.name} to print {line!r}", timeout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), WAIT)


Spawn = Callable[[str], Awaitable[RelayProcess]]


@pytest.fixture
async def spawn_relay(
    vmsdb_database: str, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str, tmp_path: Path
) -> AsyncIterator[Spawn]:
    """``await spawn_relay(name)``: a started relay process on this test's database."""
    started: list[RelayProcess] = []

    async def start(name: str) -> RelayProcess:
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.integration.kafka_relay_worker",
                vmsdb_database,
                vmsdb_kafka_broker.bootstrap,
                vmsdb_kafka_topic_prefix,
                cwd=ROOT,
                stdout=stdout,
                stderr=stderr,
                stdin=asyncio.subprocess.DEVNULL,
            )
        relay = RelayProcess(name, proc, out, err)
        started.append(relay)
        await relay.wait_for("ready")
        return relay

    try:
        yield start
    finally:
        for relay in started:
            await relay.kill()


async def place(app: App, first: int, count: int) -> None:
    shop = app.service(Shop)
    for seq in range(first, first + count):
        await shop.place(f"k{seq % 4}", seq)


async def backlog(app: App) -> int:
    async with app.core.admin() as conn:
        return await relay_log.backlog(conn, "kafka")


async def event_ids(app: App) -> set[str]:
    return {str(r.id) for r in await rows(app, "SELECT id FROM vms.events WHERE type = 'Placed'")}


async def test_relay_killed_mid_batch_republishes_and_effects_stay_once(
    vmsdb_app_factory,
    vmsdb_server: str,
    spawn_relay: Spawn,
    vmsdb_kafka_broker: KafkaBroker,
    vmsdb_kafka_topic_prefix: str,
) -> None:
    consumer_options = {
        "kafka_bootstrap": vmsdb_kafka_broker.bootstrap,
        "kafka_topic_prefix": vmsdb_kafka_topic_prefix,
        "kafka_remote": ["ktally"],
        "kafka_relay": False,
        "kafka_session_timeout_ms": 1000,
    }
    async with (
        vmsdb_app_factory([Shop]) as core_a,  # no Kafka in this process: the relay runs in another
        fresh_database(vmsdb_server) as url_b,
        vmsdb_app_factory([Tally], database_url=url_b, **consumer_options) as core_b,
    ):

        def handled(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return len(await seen(core_b, "placed")) >= count

            return check

        first = await spawn_relay("first")
        await first.wait_for("leader")
        await place(core_a, 0, 20)
        await until(handled(20), "core B to handle the first 20 events")

        with vmsdb_kafka_broker.paused():
            # One transaction takes its id first and commits last: the relay reads nothing until
            # it commits, then all 100 events as one batch, sends them, and no answer comes.
            late = asyncio.create_task(core_a.service(Shop).place("k0", 20, hold=0.5))
            await asyncio.sleep(0.1)
            await place(core_a, 21, 99)
            await late
            await asyncio.sleep(1.0)
            assert await backlog(core_a) == 100
            await first.kill()  # mid-batch: sent, maybe written by the broker, never acknowledged
        second = await spawn_relay("second")
        await second.wait_for("leader")
        await until(handled(120), "core B to handle all 120 events")
        await core_b.drain()
        await asyncio.sleep(0.3)  # a duplicate handled twice would show up by now
        await core_b.drain()

        placed = await seen(core_b, "placed")
        counters = {r.id: r.n for r in await rows(core_b, "SELECT id, n FROM ktally.counters")}
        in_kafka = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 120)
        produced = await event_ids(core_a)
        assert await backlog(core_a) == 0

    # At least once in Kafka (the killed relay's batch may be there twice) ...
    assert {headers(m)["vmsdb-event-id"] for m in in_kafka} == produced
    # ... and exactly once in effect, per key in order.
    assert len(placed) == 120 and {e for e, _, _ in placed} == produced
    assert counters == dict(Counter(f"k{s % 4}" for s in range(120)))
    for k in range(4):
        assert [s for _, key, s in placed if key == f"k{k}"] == list(range(k, 120, 4))


async def test_standby_relay_takes_over_from_a_dead_one(
    vmsdb_app_factory, spawn_relay: Spawn, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    async with vmsdb_app_factory([Shop]) as core_a:
        one, two = await asyncio.gather(spawn_relay("one"), spawn_relay("two"))

        async def someone_leads() -> bool:
            return one.said("leader") or two.said("leader")

        await until(someone_leads, "one of the relays to take the lock")
        leader, standby = (one, two) if one.said("leader") else (two, one)
        await place(core_a, 0, 10)
        await until(lambda: _published(core_a), "the leader to publish")
        assert not standby.said("leader")  # exactly one publishes

        await leader.kill()
        await place(core_a, 10, 10)
        await standby.wait_for("leader")  # its connection closed, the lock freed
        await until(lambda: _published(core_a), "the standby to publish the backlog")
        in_kafka = await read_topic(vmsdb_kafka_broker.bootstrap, f"{vmsdb_kafka_topic_prefix}Placed", 20)
        produced = await event_ids(core_a)

    assert {headers(m)["vmsdb-event-id"] for m in in_kafka} == produced
    assert len(in_kafka) == 20  # it died between batches: nothing was published twice


async def _published(app: App) -> bool:
    return await backlog(app) == 0
