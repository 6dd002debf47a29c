"""What every benchmark shares: the server, fresh databases, timed loops, results and reporting.

A benchmark is an ``async def run(bench: Bench) -> BenchmarkResult``. It measures the framework
and a hand-written baseline *in the same run*, alternating them round by round so that noise from
other work on the machine falls on both sides, and reports ratios. Nothing here asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy.ext.asyncio import create_async_engine

from dbcore.embedded import EmbeddedPostgres
from framework._internal.config import Settings, sqlalchemy_url
from framework.testing import fresh_database

__all__ = [
    "BASELINE",
    "FRAMEWORK",
    "Bench",
    "BenchmarkResult",
    "Check",
    "Comparison",
    "Measurement",
    "Target",
    "Throughput",
    "alternate",
    "asyncpg_connect_kwargs",
    "connection",
    "database_server",
    "latency_summary",
    "machine_info",
    "make_progress",
    "now_utc",
    "percentile",
    "raw_pool",
    "render",
    "run_fixed",
    "run_for",
    "wait_until_drained",
    "write_json",
]

FRAMEWORK = "vmsdb"
BASELINE = "hand-written"

# Connections each side may hold at most: the App's pool (``VMSDB_POOL_SIZE``, default 10, plus
# the core's fixed overflow of 10). The baselines get the same cap, so neither side wins by
# opening more backends; setting VMSDB_POOL_SIZE changes both sides alike.
MAX_CONNECTIONS = Settings().pool_size + 10


# -- the server and its databases --------------------------------------------------------------


@contextlib.asynccontextmanager
async def database_server() -> AsyncIterator[str]:
    """The admin URL of a server: ``VMSDB_DATABASE_URL``, or an embedded one in a temp dir."""
    configured = os.environ.get("VMSDB_DATABASE_URL")
    if configured:
        yield sqlalchemy_url(configured)
        return
    with tempfile.TemporaryDirectory(prefix="vmsdb-bench-") as tmp:
        server = EmbeddedPostgres(tmp)
        url = await asyncio.to_thread(server.start)
        try:
            yield url
        finally:
            await asyncio.to_thread(server.stop)


def asyncpg_connect_kwargs(url: str) -> dict[str, Any]:
    """``asyncpg.connect`` keyword arguments for a SQLAlchemy ``postgresql+asyncpg`` URL."""
    engine = create_async_engine(url)
    try:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
    finally:
        engine.sync_engine.dispose()
    if args:
        raise ValueError(f"unexpected positional connect arguments for {url!r}")
    return dict(kwargs)


@contextlib.asynccontextmanager
async def connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    """One asyncpg connection as the administrator: loading data, observing, checking."""
    conn = await asyncpg.connect(**asyncpg_connect_kwargs(url))
    try:
        yield conn
    finally:
        await conn.close()


async def _keep_session(_conn: asyncpg.Connection) -> None:
    return None


@contextlib.asynccontextmanager
async def raw_pool(url: str, size: int = MAX_CONNECTIONS) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool of ``size`` connections: what a hand-written service would use.

    Released connections keep their session as they are (no ``RESET ALL`` round trip), as the
    framework's SQLAlchemy pool does: otherwise each baseline transaction would pay one more
    round trip than the framework's.
    """
    pool = await asyncpg.create_pool(
        min_size=size, max_size=size, reset=_keep_session, **asyncpg_connect_kwargs(url)
    )
    try:
        yield pool
    finally:
        await pool.close()


# -- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    operations: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0


async def run_for(
    bench: Bench,
    label: str,
    seconds: float,
    concurrency: int,
    operation: Callable[[int], Awaitable[int]],
    *,
    warmup: float = 0.5,
) -> Throughput:
    """Run ``operation(worker)`` in a loop on ``concurrency`` workers; count what completes.

    ``operation`` returns how many operations it did (a lease cycle is a grant and a settle).

    Operations that complete during the first ``warmup`` seconds (connections, prepared
    statements, caches) are not counted. The window closes when the last worker stops, so an
    operation in flight at the deadline is counted with the time it took.
    """
    start = time.perf_counter()
    counted_from = start + warmup
    deadline = counted_from + seconds
    done = 0

    async def worker(index: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            did = await operation(index)
            if time.perf_counter() >= counted_from:
                done += did

    with bench.phase(label, total=warmup + seconds) as tick:
        ticker = asyncio.create_task(_tick_elapsed(tick, start))
        try:
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        finally:
            ticker.cancel()
    return Throughput(done, time.perf_counter() - counted_from)


async def run_fixed(
    bench: Bench,
    label: str,
    concurrency: int,
    per_worker: int,
    operation: Callable[[int], Awaitable[int]],
) -> Throughput:
    """Each of ``concurrency`` workers calls ``operation(worker)`` ``per_worker`` times; time it all.

    Fixed work rather than fixed time: when what an operation does depends on what came before
    (stock running out), both sides then do the same work and only its speed differs.
    """
    done = calls = 0

    async def worker(index: int) -> None:
        nonlocal done, calls
        for _ in range(per_worker):
            did = await operation(index)  # not `done += await ...`: that reads `done` too early
            done += did
            calls += 1
            tick(calls)

    with bench.phase(label, total=concurrency * per_worker) as tick:
        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return Throughput(done, time.perf_counter() - start)


async def _tick_elapsed(tick: Callable[[float], None], start: float) -> None:
    while True:
        tick(time.perf_counter() - start)
        await asyncio.sleep(0.1)


async def wait_until_drained(
    bench: Bench,
    label: str,
    total: int,
    pending: Callable[[], Awaitable[int]],
    *,
    started: float,
    timeout: float = 300.0,
    interval: float = 0.01,
) -> Throughput:
    """Poll ``pending()`` until it reaches 0; the rate of ``total`` handled since ``started``."""
    with bench.phase(label, total=total) as tick:
        while True:
            left = await pending()
            tick(total - left)
            if left == 0:
                return Throughput(total, time.perf_counter() - started)
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{label}: {left} of {total} still pending after {timeout:.0f} s")
            await asyncio.sleep(interval)


async def alternate(
    rounds: int, sides: dict[str, Callable[[int], Awaitable[float]]]
) -> dict[str, list[float]]:
    """Run each side once per round, alternating (A B, B A, ...), so drift hits both alike."""
    results: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for index in range(rounds):
        for name in order if index % 2 == 0 else reversed(order):
            results[name].append(await sides[name](index))
    return results


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "samples": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=float("nan")),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target from DESIGN.md's Performance section, checked against one comparison."""

    kind: Literal["min_ratio", "min_value", "max_value"]
    threshold: float

    def met(self, value: float, ratio: float) -> bool:
        if self.kind == "min_ratio":
            return ratio >= self.threshold
        if self.kind == "min_value":
            return value >= self.threshold
        return value < self.threshold

    def describe(self, unit: str) -> str:
        if self.kind == "min_ratio":
            return f"ratio ≥ {self.threshold:g}"
        sign = "≥" if self.kind == "min_value" else "<"
        return f"{sign} {self.threshold:,.0f} {unit}"


@dataclass
class Comparison:
    """One metric measured on both sides in the same run."""

    metric: str
    unit: str
    framework: float
    baseline: float
    higher_is_better: bool = True
    target: Target | None = None
    rounds: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """framework ÷ baseline for rates; baseline ÷ framework for latencies (>1: vmsdb wins)."""
        num, den = (
            (self.framework, self.baseline) if self.higher_is_better else (self.baseline, self.framework)
        )
        return num / den if den else float("nan")

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.framework, self.ratio)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = None if self.target is None else self.target.describe(self.unit)
        data["ratio"] = self.ratio
        data["met"] = self.met
        return data


@dataclass
class Measurement:
    """A figure with no hand-written counterpart (the eShop's mix): reported as measured."""

    metric: str
    unit: str
    value: float | str


@dataclass
class Check:
    """A correctness check made at the end of a run (reported, never asserted)."""

    name: str
    framework: Any
    baseline: Any
    ok: bool


@dataclass
class BenchmarkResult:
    name: str
    description: str
    comparisons: list[Comparison] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self, machine: dict[str, Any], started_at: datetime, seconds: float) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "description": self.description,
            "started_at": started_at.isoformat(timespec="seconds"),
            "wall_seconds": round(seconds, 1),
            "machine": machine,
            "comparisons": [c.to_json() for c in self.comparisons],
            "measurements": [asdict(m) for m in self.measurements],
            "checks": [asdict(c) for c in self.checks],
            "notes": self.notes,
            "details": self.details,
        }


def render(result: BenchmarkResult) -> Table:
    table = Table(title=f"{result.name}: {result.description}", title_justify="left")
    table.add_column("metric")
    table.add_column(FRAMEWORK, justify="right")
    table.add_column(BASELINE, justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("target")
    for c in result.comparisons:
        status = "" if c.met is None else (" [green]met[/]" if c.met else " [red]missed[/]")
        target = "" if c.target is None else c.target.describe(c.unit) + status
        table.add_row(
            f"{c.metric} ({c.unit})", _number(c.framework), _number(c.baseline), f"{c.ratio:.2f}", target
        )
    for m in result.measurements:
        value = m.value if isinstance(m.value, str) else _number(m.value)
        table.add_row(f"{m.metric} ({m.unit})", value, "—", "", "")
    for check in result.checks:
        mark = "[green]ok[/]" if check.ok else "[red]FAILED[/]"
        table.add_row(check.name, str(check.framework), str(check.baseline), "", mark)
    if result.notes:
        table.caption = "\n".join(result.notes)
        table.caption_justify = "left"
    return table


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


async def machine_info(server_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(**asyncpg_connect_kwargs(server_url))
    try:
        version = await conn.fetchval("SHOW server_version")
        sync_commit = await conn.fetchval("SHOW synchronous_commit")
        fsync = await conn.fetchval("SHOW fsync")
    finally:
        await conn.close()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": version,
        "postgres_fsync": fsync,
        "postgres_synchronous_commit": sync_commit,
        "embedded_postgres": "VMSDB_DATABASE_URL" not in os.environ,
        "app_pool_size": Settings().pool_size,
        "max_connections_per_side": MAX_CONNECTIONS,
        "load_average_at_start": os.getloadavg(),
    }


# -- a running benchmark -----------------------------------------------------------------------


class Bench:
    """What a benchmark gets: its time budget, rounds, databases and a progress display."""

    def __init__(
        self,
        server_url: str,
        *,
        seconds: float,
        rounds: int,
        progress: Progress,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.server_url = server_url
        self.seconds = seconds
        self.rounds = rounds
        self.progress = progress
        #: Options of one benchmark (``eshop``: external, mixes, clients, workers).
        self.options: dict[str, Any] = options or {}

    def phase_seconds(self, phases: int) -> float:
        """Measuring time for each of ``phases`` timed phases, splitting the budget over rounds."""
        return max(self.seconds / (phases * self.rounds), 0.5)

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[str]:
        """A fresh database for one benchmark, dropped afterwards."""
        async with fresh_database(self.server_url) as url:
            yield url

    @contextlib.contextmanager
    def phase(self, label: str, total: float) -> Iterator[Callable[[float], None]]:
        """Show ``label`` with a bar; the yielded function sets how much of ``total`` is done."""
        task: TaskID = self.progress.add_task(label, total=total)

        def tick(completed: float) -> None:
            self.progress.update(task, completed=min(completed, total))

        try:
            yield tick
        finally:
            self.progress.remove_task(task)


def make_progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def now_utc() -> datetime:
    return datetime.now(UTC)
