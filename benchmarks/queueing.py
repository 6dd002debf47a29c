"""Pieces the event benchmarks share: loading a backlog into the log, and hand-written workers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import asyncpg

from framework import Event
from vmsdb_bench.harness import Bench, Throughput, wait_until_drained

__all__ = [
    "ANALYZE_NOTE",
    "WARMUP_EVENTS",
    "QueueWorkers",
    "Step",
    "backlog_size",
    "log_events",
    "measure_drain",
    "next_seq",
]

_seq = itertools.count(1)

#: Events drained, unmeasured, before each measured backlog.
WARMUP_EVENTS = 300


def next_seq() -> int:
    """A number unique in this process: event payloads stay unique across rounds and sides."""
    return next(_seq)


# The framework's own outbox statement (dbcore.eventlog), as the administrator: the fan-out
# trigger creates one delivery per subscriber and NOTIFYs them at commit.
_LOG_EVENTS = """
    INSERT INTO vms.events (id, type, key, payload, producer)
    SELECT id, type, key, payload::jsonb, NULL
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS t(id, type, key, payload)
"""


async def log_events(conn: asyncpg.Connection, events: Sequence[Event]) -> None:
    """Append ``events`` to the core's event log in one transaction (as ``App.publish`` would).

    The deliveries table is analyzed in the same transaction (see :data:`ANALYZE_NOTE`).
    """
    async with conn.transaction():
        await conn.execute(
            _LOG_EVENTS,
            [uuid.uuid4() for _ in events],
            [e.event_type() for e in events],
            [e.partition_key() for e in events],
            [e.model_dump_json() for e in events],
        )
        await conn.execute("ANALYZE vms.deliveries")


#: Why backlogs are loaded together with an ANALYZE of the queue table, on both sides.
ANALYZE_NOTE = (
    "queue tables are ANALYZEd with each backlog (untimed, both sides): the benchmarks measure "
    "steady state, not the minute before autovacuum first analyzes a table created empty"
)


#: One unit of hand-written work in the transaction it is given; ``False``: nothing to do.
Step = Callable[[asyncpg.Connection], Awaitable[bool]]


class QueueWorkers:
    """A hand-written worker pool: ``concurrency`` loops, one transaction per job.

    Idle workers wait for a NOTIFY on ``channel`` and poll as a fallback, backing off from 5 ms
    to 0.5 s: the same wake-up policy as the framework's dispatcher, so idle cost and latency are
    compared like for like. Every worker has its own wake-up flag, so a notification that
    arrives while a worker is busy is not lost.
    """

    FIRST_POLL = 0.005
    POLL_INTERVAL = 0.5

    def __init__(
        self,
        pool: asyncpg.Pool,
        connect_kwargs: dict[str, Any],
        *,
        concurrency: int,
        channel: str,
        step: Step,
    ) -> None:
        self.pool = pool
        self.connect_kwargs = connect_kwargs
        self.concurrency = concurrency
        self.channel = channel
        self.step = step
        self._wakes = [asyncio.Event() for _ in range(concurrency)]
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None

    async def __aenter__(self) -> QueueWorkers:
        self._listener = await asyncpg.connect(**self.connect_kwargs)
        await self._listener.add_listener(self.channel, self._on_notify)
        self._tasks = [asyncio.create_task(self._work(i)) for i in range(self.concurrency)]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        for wake in self._wakes:
            wake.set()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            if self._listener is not None:
                await self._listener.close()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        for wake in self._wakes:
            wake.set()

    async def _work(self, index: int) -> None:
        wake = self._wakes[index]
        idle = self.FIRST_POLL
        while not self._stopping:
            wake.clear()
            async with self.pool.acquire() as conn, conn.transaction():
                worked = await self.step(conn)
            if worked:
                idle = self.FIRST_POLL
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), idle)
            idle = self.FIRST_POLL if wake.is_set() else min(idle * 2, self.POLL_INTERVAL)


async def measure_drain(
    bench: Bench,
    label: str,
    count: int,
    *,
    enqueue: Callable[[int], Awaitable[None]],
    pending: Callable[[], Awaitable[int]],
    warmup: int = WARMUP_EVENTS,
) -> Throughput:
    """Events/s handling a backlog of ``count`` that becomes visible at once (one commit).

    Workers must already be running and idle. A small backlog of ``warmup`` is drained first,
    unmeasured (connections, prepared statements, caches); then the clock starts when the
    backlog's transaction has committed and stops when nothing is pending.
    """
    started = time.perf_counter()
    await enqueue(warmup)
    await wait_until_drained(bench, f"{label}: warm-up", warmup, pending, started=started)
    await enqueue(count)
    return await wait_until_drained(bench, label, count, pending, started=time.perf_counter())


def backlog_size(rate: float, seconds: float, *, low: int = 1_000, high: int = 200_000) -> int:
    """A backlog that takes about ``seconds`` to drain at ``rate``."""
    return max(low, min(high, round(rate * seconds / 100) * 100))
