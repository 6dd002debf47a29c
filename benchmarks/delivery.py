"""``delivery``: in-database delivery end to end, against a hand-written LISTEN/NOTIFY queue.

Throughput: a backlog of events over many partition keys becomes visible in one commit; the
handler writes one row per event; events/s until nothing is pending. The handler writes its row
in one of two styles, each drained on its own: the hand-written side's ``INSERT`` on the
transaction's asyncpg connection (``connection()``'s driver: what the framework itself costs),
and ``session().add(...)`` (what the ORM's unit of work adds on top), and the ORM again with
``@Inbound(group_commit=16)`` (queued deliveries handled 16 to a transaction).

Latency: one event at a time at a low rate (idle workers); for each, the time from its commit
(the publisher's commit returned) to the moment its handler starts.

The baseline is the queue people write by hand: a jobs table, ``NOTIFY`` on insert, workers that
``DELETE ... RETURNING`` the oldest row with ``FOR UPDATE SKIP LOCKED`` and write the row in the
same transaction. It keeps no order per key, does not wait for earlier transactions to commit
(no gap protection), and has no claims, retries or dead letters: it is the fast end of the
comparison, not an equivalent.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy import BigInteger
from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Event, Inbound, Service, Settings, connection, session
from vmsdb_bench.harness import (
    BASELINE,
    FRAMEWORK,
    Bench,
    BenchmarkResult,
    Comparison,
    Target,
    alternate,
    asyncpg_connect_kwargs,
    latency_summary,
    raw_pool,
    wait_until_drained,
)
from vmsdb_bench.harness import connection as admin_connection
from vmsdb_bench.queueing import ANALYZE_NOTE, QueueWorkers, backlog_size, log_events, measure_drain, next_seq

NAME = "delivery"
DESCRIPTION = "in-database delivery end to end vs a hand-written LISTEN/NOTIFY + SKIP LOCKED queue"
DEFAULT_SECONDS = 16.0

KEYS = 1_000
#: How the framework's handler writes its row (see the module docstring), and the side's name.
GROUP = 16
STYLES = {
    "driver": FRAMEWORK,
    "orm": f"{FRAMEWORK} ORM",
    "grouped": f"{FRAMEWORK} ORM, group_commit={GROUP}",
}
LATENCY_RATE = 100.0  # events/s: low enough that workers are idle between events
WORKERS = Settings().worker_concurrency

#: When each event's handler started (perf_counter), by sequence number; both sides write it.
STARTED: dict[int, float] = {}


class Ping(Event, key="key"):
    key: str
    seq: int
    style: str = "driver"


class GroupedPing(Event, key="key"):
    """A ``Ping`` whose handler runs queued deliveries in groups."""

    key: str
    seq: int


class Sink(Service, name="sink"):
    @Inbound(GroupedPing, group_commit=GROUP)
    async def on_grouped(self, event: GroupedPing) -> None:
        STARTED.setdefault(event.seq, time.perf_counter())
        session().add(Received(seq=event.seq, key=event.key))

    @Inbound(Ping)
    async def on_ping(self, event: Ping) -> None:
        STARTED.setdefault(event.seq, time.perf_counter())
        if event.style == "orm":
            session().add(Received(seq=event.seq, key=event.key))
        else:  # the hand-written side's statement, in the handler's transaction
            driver = (await connection().get_raw_connection()).driver_connection
            assert driver is not None
            await driver.execute(_RECORD_SINK, event.seq, event.key)


class Received(Sink.Model):
    __tablename__ = "received"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    key: Mapped[str]


# -- the hand-written queue ------------------------------------------------------------------

_CHANNEL = "rawq"
_SCHEMA = (
    "CREATE SCHEMA rawq",
    "CREATE TABLE rawq.jobs (id bigserial PRIMARY KEY, key text, payload jsonb NOT NULL)",
    "CREATE TABLE rawq.received (seq bigint PRIMARY KEY, key text NOT NULL)",
)
_PUBLISH = (
    "INSERT INTO rawq.jobs (key, payload) SELECT k, p::jsonb FROM unnest($1::text[], $2::text[]) AS t(k, p)"
)
_NOTIFY = f"SELECT pg_notify('{_CHANNEL}', '')"
_TAKE = """
    DELETE FROM rawq.jobs
     WHERE id = (SELECT id FROM rawq.jobs ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING payload::text
"""
_RECORD = "INSERT INTO rawq.received (seq, key) VALUES ($1, $2)"
_RECORD_SINK = "INSERT INTO sink.received (seq, key) VALUES ($1, $2)"


async def raw_publish(conn: asyncpg.Connection, events: list[Ping]) -> None:
    async with conn.transaction():
        await conn.execute(_PUBLISH, [e.key for e in events], [json.dumps(e.model_dump()) for e in events])
        await conn.execute(_NOTIFY)
        if len(events) > 1:
            await conn.execute("ANALYZE rawq.jobs")  # see ANALYZE_NOTE


async def raw_handle_one(conn: asyncpg.Connection) -> bool:
    payload = await conn.fetchval(_TAKE)
    if payload is None:
        return False
    event = json.loads(payload)
    STARTED.setdefault(event["seq"], time.perf_counter())
    await conn.execute(_RECORD, event["seq"], event["key"])
    return True


# -- the run ---------------------------------------------------------------------------------


def _pings(count: int, style: str = "driver") -> list[Ping] | list[GroupedPing]:
    seqs = [next_seq() for _ in range(count)]
    if style == "grouped":
        return [GroupedPing(key=f"k{seq % KEYS}", seq=seq) for seq in seqs]
    return [Ping(key=f"k{seq % KEYS}", seq=seq, style=style) for seq in seqs]


class Side:
    """One side with its workers running: how to publish to it and how much is pending."""

    def __init__(
        self,
        name: str,
        publish: Callable[[list[Ping]], Awaitable[None]],
        pending: Callable[[], Awaitable[int]],
        style: str = "driver",
    ) -> None:
        self.name = name
        self.publish = publish
        self.pending = pending
        self.style = style

    async def enqueue(self, count: int) -> None:
        await self.publish(_pings(count, self.style))


#: A measurement made on a running side in a given round.
Measure = Callable[[Side, int], Awaitable[float]]


class _Sides:
    """Starts either side's workers on the benchmark's database for one measurement."""

    def __init__(self, url: str, observer: asyncpg.Connection) -> None:
        self.url = url
        self.observer = observer

    def __call__(
        self, measure: Measure, styles: tuple[str, ...] = ("driver",)
    ) -> dict[str, Callable[[int], Awaitable[float]]]:
        sides: dict[str, Callable[[int], Awaitable[float]]] = {
            STYLES[style]: functools.partial(self.framework, measure, style=style) for style in styles
        }
        sides[BASELINE] = functools.partial(self.baseline, measure)
        return sides

    async def framework(self, measure: Measure, round_: int, *, style: str = "driver") -> float:
        async with App([Sink], database_url=self.url) as app:

            async def publish(events: list[Ping]) -> None:
                if len(events) == 1:
                    await app.publish(events[0])  # what a producer outside any service calls
                else:
                    await log_events(self.observer, events)  # a backlog, in one commit

            async def pending() -> int:
                count: int = await self.observer.fetchval(
                    "SELECT count(*) FROM vms.deliveries WHERE subscriber = 'sink'"
                )
                return count

            return await measure(Side(STYLES[style], publish, pending, style), round_)

    async def baseline(self, measure: Measure, round_: int) -> float:
        async with (
            raw_pool(self.url) as pool,
            QueueWorkers(
                pool,
                asyncpg_connect_kwargs(self.url),
                concurrency=WORKERS,
                channel=_CHANNEL,
                step=raw_handle_one,
            ),
        ):

            async def publish(events: list[Ping]) -> None:
                async with pool.acquire() as conn:
                    await raw_publish(conn, events)

            async def pending() -> int:
                count: int = await self.observer.fetchval("SELECT count(*) FROM rawq.jobs")
                return count

            return await measure(Side(BASELINE, publish, pending), round_)


class _Throughput:
    def __init__(self, bench: Bench, seconds: float) -> None:
        self.bench = bench
        self.seconds = seconds
        self.backlog = 0

    async def calibrate(self, side: Side, _round: int) -> float:
        """Size the backlog from a short drain; every measured drain then uses that size."""
        probe = await measure_drain(
            self.bench, "calibrating", 1_000, enqueue=side.enqueue, pending=side.pending
        )
        self.backlog = backlog_size(probe.rate, self.seconds)
        return probe.rate

    async def measure(self, side: Side, round_: int) -> float:
        label = f"{side.name} backlog, round {round_ + 1}"
        result = await measure_drain(
            self.bench, label, self.backlog, enqueue=side.enqueue, pending=side.pending
        )
        return result.rate


class _Latency:
    """Publish one event at a time at ``LATENCY_RATE``; keep commit-to-handler latencies."""

    WARMUP = 10  # events published first and not counted (connections, statements)

    def __init__(self, bench: Bench, seconds: float) -> None:
        self.bench = bench
        self.count = max(int(seconds * LATENCY_RATE), 10)
        self.samples: dict[str, list[float]] = {FRAMEWORK: [], BASELINE: []}

    async def measure(self, side: Side, round_: int) -> float:
        committed: dict[int, float] = {}
        total = self.WARMUP + self.count
        label = f"{side.name} latency at {LATENCY_RATE:.0f}/s, round {round_ + 1}"
        start = time.perf_counter()
        with self.bench.phase(label, total=total) as tick:
            for i in range(total):
                await asyncio.sleep(max(0.0, start + i / LATENCY_RATE - time.perf_counter()))
                (event,) = _pings(1)
                await side.publish([event])
                if i >= self.WARMUP:
                    committed[event.seq] = time.perf_counter()
                tick(i + 1)
        await wait_until_drained(self.bench, f"{label}: last events", total, side.pending, started=start)
        # The handler may start a hair before the publisher's coroutine resumes: count that as 0.
        latencies = [max(0.0, STARTED[seq] - t) for seq, t in committed.items() if seq in STARTED]
        self.samples[side.name].extend(latencies)
        return latency_summary(latencies)["p50_ms"]


async def run(bench: Bench) -> BenchmarkResult:
    phase = bench.phase_seconds(phases=5)
    async with bench.database() as url, admin_connection(url) as observer:
        async with App([Sink], database_url=url, create_tables=True, workers=False):
            pass
        for statement in _SCHEMA:
            await observer.execute(statement)
        sides = _Sides(url, observer)
        throughput = _Throughput(bench, phase)
        await sides.framework(throughput.calibrate, 0)
        drained = await alternate(bench.rounds, sides(throughput.measure, tuple(STYLES)))
        latency = _Latency(bench, phase)
        await alternate(bench.rounds, sides(latency.measure))

    summaries = {side: latency_summary(samples) for side, samples in latency.samples.items()}
    result = BenchmarkResult(NAME, DESCRIPTION)
    result.comparisons = [
        Comparison(
            f"backlog drain, {WORKERS} workers",
            "events/s",
            max(drained[FRAMEWORK]),
            max(drained[BASELINE]),
            target=Target("min_value", 3_000),
            rounds={side: drained[side] for side in (FRAMEWORK, BASELINE)},
        ),
        Comparison(
            f"backlog drain, {WORKERS} workers, handler writes with the ORM",
            "events/s",
            max(drained[STYLES["orm"]]),
            max(drained[BASELINE]),
            rounds={side: drained[side] for side in (STYLES["orm"], BASELINE)},
        ),
        Comparison(
            f"backlog drain, {WORKERS} workers, ORM handler with group_commit={GROUP}",
            "events/s",
            max(drained[STYLES["grouped"]]),
            max(drained[BASELINE]),
            rounds={side: drained[side] for side in (STYLES["grouped"], BASELINE)},
        ),
        *(
            Comparison(
                f"idle latency {name}",
                "ms",
                summaries[FRAMEWORK][f"{name}_ms"],
                summaries[BASELINE][f"{name}_ms"],
                higher_is_better=False,
                target=None if limit is None else Target("max_value", limit),
            )
            for name, limit in (("p50", 5.0), ("p90", None), ("p99", 25.0))
        ),
    ]
    result.notes = [
        f"backlog of {throughput.backlog:,} events over {KEYS:,} keys; best of {bench.rounds} rounds",
        "the handler writes its row with the hand-written side's INSERT on the transaction's "
        "driver connection; the ORM row: with session().add(...)",
        f"idle latency: commit to handler start, one event at a time at {LATENCY_RATE:.0f}/s, "
        f"{summaries[FRAMEWORK]['samples']:.0f} samples per side over all rounds; "
        "latency ratio is hand-written ÷ vmsdb (above 1: vmsdb faster)",
        "the hand-written queue keeps no per-key order and no gap protection: the fast end, not an equal",
        ANALYZE_NOTE,
    ]
    result.details = {
        "backlog": throughput.backlog,
        "keys": KEYS,
        "latency": summaries,
        "phase_seconds": phase,
    }
    return result
