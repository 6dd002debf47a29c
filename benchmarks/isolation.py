"""``isolation``: a victim service's latency next to a noisy neighbour, without and with limits.

One App runs two services on one core. The *victim* serves short transactions (one caller
updating one row, with a few milliseconds between calls) and light events (a handler updating
one row, an event every 20 ms); its latency is measured per call and, for events, from
``publish`` to the end of the handler. The *noisy neighbour* is hammered at the same time:
many concurrent callers looping on a slow transaction (``pg_sleep``), a flood of slow
handlers, and callers of heavy queries (CPU in Postgres). Three phases, in one run:

- ``idle``: the victim alone;
- ``unlimited``: the neighbour without ``ServiceLimits`` (today's behaviour);
- ``limited``: the neighbour declared with ``ServiceLimits(concurrency=, connections=,
  statement_timeout=)`` (a second App on the same database: limits are the class's).

Reported: the victim's p50 and p99 in each phase, and the ratio of the limited p99 to the idle
p99 (DESIGN.md's target: within 2x, plus a few milliseconds). Nothing here asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Event, Inbound, Service, ServiceLimits, StatementTimeout, Transactional, session
from vmsdb_bench.harness import Bench, BenchmarkResult, Check, Measurement, latency_summary

NAME = "isolation"
DESCRIPTION = "a victim service's p50/p99 next to a noisy neighbour, idle / unlimited / limited"
DEFAULT_SECONDS = 30.0

#: The neighbour's limits in the ``limited`` phase.
LIMITS = ServiceLimits(concurrency=4, connections=6, statement_timeout=timedelta(milliseconds=500))
SLOW_CALLERS = 60  # concurrent callers looping on the neighbour's slow transaction
SLOW_SECONDS = 0.3
HEAVY_CALLERS = 6  # concurrent callers of the neighbour's heavy query
HEAVY_ROWS = 2_000_000  # rows counted by one heavy query (~0.1-0.3 s of CPU)
FLOOD_PER_SECOND = 100  # the neighbour's slow events published per second
FLOOD_HANDLER_SECONDS = 0.2
VICTIM_PAUSE = 0.005  # between the victim's calls
VICTIM_EVENT_EVERY = 0.02
ALLOWANCE_MS = 5.0  # "plus a few milliseconds"


class VictimPing(Event, key="key"):
    key: str
    sent: float  # time.perf_counter() at publish (same process)


class NoisyJob(Event, key="key"):
    key: str


class Victim(Service, name="bench_victim"):
    event_latencies: list[float] = []

    @Transactional(type="RW")
    async def touch(self, key: int) -> None:
        await session().execute(update(Counter).where(Counter.id == key).values(n=Counter.n + 1))

    @Inbound(VictimPing)
    @Transactional(type="RW")
    async def on_ping(self, ping: VictimPing) -> None:
        await session().execute(update(Counter).where(Counter.id == 0).values(n=Counter.n + 1))
        type(self).event_latencies.append(time.perf_counter() - ping.sent)


class Counter(Victim.Model):
    __tablename__ = "counters"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]


def _neighbour(limits: ServiceLimits | None) -> type[Service]:
    """The noisy neighbour, without or with limits (a class per phase: limits are the class's)."""

    class Noisy(Service, name="bench_noisy", limits=limits):
        @Transactional(type="RW")
        async def slow(self) -> None:
            await session().execute(text("SELECT pg_sleep(:s)"), {"s": SLOW_SECONDS})

        @Transactional(type="RO")
        async def heavy(self) -> int:
            statement = text("SELECT count(*) FROM generate_series(1, :n) g WHERE g % 7 = 3")
            return int((await session().execute(statement, {"n": HEAVY_ROWS})).scalar_one())

        @Inbound(NoisyJob)
        @Transactional(type="RW")
        async def on_job(self, job: NoisyJob) -> None:
            await session().execute(text("SELECT pg_sleep(:s)"), {"s": FLOOD_HANDLER_SECONDS})

    return Noisy


async def _loop_until(deadline: float, call: Callable[[], Awaitable[Any]], errors: dict[str, int]) -> None:
    while time.perf_counter() < deadline:
        try:
            await call()
        except StatementTimeout:
            errors["statement timeouts"] = errors.get("statement timeouts", 0) + 1
        except Exception as err:  # a refused call is part of the load, not of the measurement
            errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1


@contextlib.asynccontextmanager
async def _noise(app: App, neighbour: type[Service], seconds: float) -> AsyncIterator[dict[str, int]]:
    """Hammer the neighbour for ``seconds`` while the block measures the victim."""
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    noisy = app.service(neighbour)

    async def flood() -> None:
        sent = 0
        while time.perf_counter() < deadline:
            await app.publish(*(NoisyJob(key=f"j{sent + i}") for i in range(10)))
            sent += 10
            await asyncio.sleep(10 / FLOOD_PER_SECOND)

    tasks = [asyncio.create_task(_loop_until(deadline, noisy.slow, errors)) for _ in range(SLOW_CALLERS)]
    tasks += [asyncio.create_task(_loop_until(deadline, noisy.heavy, errors)) for _ in range(HEAVY_CALLERS)]
    tasks.append(asyncio.create_task(flood()))
    try:
        yield errors
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)


async def _victim(app: App, seconds: float) -> tuple[list[float], list[float]]:
    """The victim's call latencies and event latencies over ``seconds``."""
    Victim.event_latencies = []
    victim = app.service(Victim)
    calls: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        key = 0
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await victim.touch(1 + key % 100)
            calls.append(time.perf_counter() - start)
            key += 1
            await asyncio.sleep(VICTIM_PAUSE)

    async def pinger() -> None:
        n = 0
        while time.perf_counter() < deadline:
            await app.publish(VictimPing(key=f"v{n % 8}", sent=time.perf_counter()))
            n += 1
            await asyncio.sleep(VICTIM_EVENT_EVERY)

    await asyncio.gather(caller(), pinger())
    await app.drain(timeout=120)  # the victim's events still in flight are measured too
    return calls, list(Victim.event_latencies)


async def _phase(
    url: str, neighbour: type[Service], seconds: float, *, noisy: bool, tick: Callable[[float], None]
) -> dict[str, Any]:
    async with App([Victim, neighbour], database_url=url, create_tables=True) as app:
        async with app.core.admin() as conn:
            await conn.execute(
                text("INSERT INTO bench_victim.counters SELECT g, 0 FROM generate_series(0, 100) g "
                     "ON CONFLICT DO NOTHING")
            )  # fmt: skip
        await _victim(app, min(2.0, seconds / 4))  # warm up
        errors: dict[str, int] = {}
        if noisy:
            async with _noise(app, neighbour, seconds) as errors:
                calls, events = await _victim(app, seconds)
        else:
            calls, events = await _victim(app, seconds)
        tick(seconds)
        await app.drain(timeout=300)  # the neighbour's flood, before the next phase
    return {
        "calls": latency_summary(calls),
        "events": latency_summary(events),
        "neighbour_errors": errors,
    }


async def run(bench: Bench) -> BenchmarkResult:
    seconds = bench.phase_seconds(3) * bench.rounds  # one round: three phases of the budget
    phases: dict[str, dict[str, Any]] = {}
    async with bench.database() as url:
        for label, neighbour, noisy in (
            ("idle", _neighbour(None), False),
            ("unlimited", _neighbour(None), True),
            ("limited", _neighbour(LIMITS), True),
        ):
            with bench.phase(f"isolation: {label}", seconds) as tick:
                phases[label] = await _phase(url, neighbour, seconds, noisy=noisy, tick=tick)
    details = {"phases": phases, "limits": LIMITS.descriptor().model_dump()}
    result = BenchmarkResult(NAME, DESCRIPTION, details=details)
    for kind, what in (("calls", "victim 1-row transaction"), ("events", "victim event, publish to handled")):
        for label in phases:
            summary = phases[label][kind]
            result.measurements.append(
                Measurement(
                    f"{what}, {label}: p50 / p99", "ms", f"{summary['p50_ms']:.2f} / {summary['p99_ms']:.2f}"
                )
            )
        idle, limited = phases["idle"][kind]["p99_ms"], phases["limited"][kind]["p99_ms"]
        unlimited = phases["unlimited"][kind]["p99_ms"]
        result.measurements.append(
            Measurement(f"{what}: p99 unlimited / idle, limited / idle", "x",
                        f"{unlimited / idle:.2f} / {limited / idle:.2f}")
        )  # fmt: skip
        result.checks.append(
            Check(
                f"{what}: limited p99 ≤ 2x idle p99 + {ALLOWANCE_MS:g} ms",
                f"{limited:.2f} ms",
                f"{2 * idle + ALLOWANCE_MS:.2f} ms",
                limited <= 2 * idle + ALLOWANCE_MS,
            )
        )
    result.notes.append(
        f"neighbour: {SLOW_CALLERS} callers of a {SLOW_SECONDS * 1000:.0f} ms transaction, "
        f"{HEAVY_CALLERS} callers of a count over {HEAVY_ROWS:,} rows, {FLOOD_PER_SECOND} events/s "
        f"of {FLOOD_HANDLER_SECONDS * 1000:.0f} ms handlers; limited: {LIMITS.descriptor().describe()}"
    )
    for label in ("unlimited", "limited"):
        refused = phases[label]["neighbour_errors"]
        result.notes.append(f"neighbour's refused calls, {label}: {refused or 'none'}")
    return result
