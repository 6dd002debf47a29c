"""``handler``: a ``@Transactional`` handler against the same transaction on raw asyncpg.

Both sides do, per event and in one transaction: take the event from the inbox, read one
account row ``FOR UPDATE``, write it back, insert one outgoing event into the log and remove the
inbox row. They run on the same tables (``ledger.accounts``, ``vms.events``, ``vms.deliveries``
with its fan-out trigger). The framework's handler body is written three ways, each measured on
its own: with the hand-written side's statements on the transaction's asyncpg connection
(``driver``: the difference is then the framework itself: claims, transactions under the
service's role, row-level security, the outbox, the acknowledgement, pydantic), with SQLAlchemy
Core statements on ``connection()`` (``core``), and with the ORM session (``orm``: what most
users write; SQLAlchemy's unit of work comes on top). The direct call adds a fourth body,
``core-prebuilt``: the same Core statements built once at import with ``bindparam()`` (the
fast path the README gives for a hot handler), which skips building the statement and its
cache key in every call.

The hand-written worker claims the event inside its own transaction with ``FOR UPDATE SKIP
LOCKED`` and keeps the same ordering rules the framework keeps (only events below the snapshot
horizon, one event per partition key at a time); it skips what a hand-written loop usually
skips: claim deadlines, attempt counts and dead letters, retries, roles.

A fourth framework side runs the ``driver`` body with OpenTelemetry tracing on (the SDK, spans
handed to a batch processor whose exporter drops them): its ratio to the same side with tracing
off is what tracing costs; with tracing off the hooks are a single check each.

The second comparison is a direct call: ``await app.service(Ledger).bump(...)`` from 8
concurrent callers against the same read-modify-write-and-send transaction on asyncpg (the
``driver``, ``core``, ``core-prebuilt`` and ``orm`` bodies), and the SQLAlchemy bodies against the
same code on plain SQLAlchemy without the framework (an ``AsyncSession`` or ``AsyncConnection`` on an
engine of the App's pool size, the event inserted into the log as one more statement): that
ratio is the framework's own overhead, SQLAlchemy's cost being on both sides.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import uuid
from collections.abc import Awaitable, Callable, Iterator

import asyncpg
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
from sqlalchemy.orm import Mapped, mapped_column

from dbcore.eventlog import NOTIFY_CHANNEL
from dbcore.eventlog import events as event_log
from framework import (
    App,
    Event,
    Inbound,
    Outbound,
    Service,
    Settings,
    Transactional,
    connection,
    send,
    session,
)
from framework._internal import telemetry
from vmsdb_bench.harness import (
    BASELINE,
    FRAMEWORK,
    Bench,
    BenchmarkResult,
    Check,
    Comparison,
    Target,
    alternate,
    asyncpg_connect_kwargs,
    raw_pool,
    run_for,
)
from vmsdb_bench.harness import connection as admin_connection
from vmsdb_bench.queueing import (
    ANALYZE_NOTE,
    WARMUP_EVENTS,
    QueueWorkers,
    backlog_size,
    log_events,
    measure_drain,
)

NAME = "handler"
DESCRIPTION = "@Transactional handler (read-modify-write + emit + inbox mark) vs raw asyncpg"
DEFAULT_SECONDS = 30.0

ACCOUNTS = 1_000
DIRECT_CONCURRENCY = 8
HANDLER_CONCURRENCY = Settings().worker_concurrency


class Bump(Event, key="account"):
    account: str
    amount: int
    style: str = "driver"


class Bumped(Event, key="account"):
    account: str
    balance: int


# The handler's body, the code a user writes, in three styles (see the module docstring).


async def _bump_driver(account: str, amount: int) -> int:
    driver = (await connection().get_raw_connection()).driver_connection
    assert driver is not None
    balance: int = await driver.fetchval(_READ, account) + amount
    await driver.execute(_WRITE, account, balance)
    send(Bumped(account=account, balance=balance))
    return balance


async def _bump_core(account: str, amount: int) -> int:
    read = select(Account.balance).where(Account.id == account).with_for_update()
    balance: int = (await connection().execute(read)).scalar_one() + amount
    await connection().execute(update(Account).where(Account.id == account).values(balance=balance))
    send(Bumped(account=account, balance=balance))
    return balance


async def _bump_core_prebuilt(account: str, amount: int) -> int:
    read = await connection().execute(_READ_BALANCE, {"account": account})
    balance: int = read.scalar_one() + amount
    await connection().execute(_WRITE_BALANCE, {"account": account, "new_balance": balance})
    send(Bumped(account=account, balance=balance))
    return balance


async def _bump_orm(account: str, amount: int) -> int:
    row = await session().get(Account, account, with_for_update=True)
    assert row is not None
    row.balance += amount
    send(Bumped(account=account, balance=row.balance))
    return row.balance


BODIES: dict[str, Callable[[str, int], Awaitable[int]]] = {
    "driver": _bump_driver,
    "core": _bump_core,
    "core-prebuilt": _bump_core_prebuilt,
    "orm": _bump_orm,
}
#: Each style's side name in the results.
STYLES = {
    "driver": FRAMEWORK,
    "core": f"{FRAMEWORK} Core",
    "core-prebuilt": f"{FRAMEWORK} Core prebuilt",
    "orm": f"{FRAMEWORK} ORM",
}
#: The styles drained as inbound handlers (the direct call runs them all).
INBOUND_STYLES = ("driver", "core", "orm")
#: The ``driver`` style with tracing on.
TRACED = f"{FRAMEWORK} traced"


@contextlib.contextmanager
def tracing_on() -> Iterator[None]:
    """OpenTelemetry's SDK on for the block, exporting nowhere: the cost of making spans."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    with telemetry.tracing_with(provider):
        yield
    provider.shutdown()


class Ledger(Service, name="ledger"):
    @Inbound(Bump)
    @Outbound(Bumped)
    @Transactional(type="RW", isolation="read_committed")
    async def on_bump(self, event: Bump) -> None:
        await BODIES[event.style](event.account, event.amount)

    @Outbound(Bumped)
    @Transactional(type="RW", isolation="read_committed")
    async def bump(self, account: str, amount: int, style: str = "driver") -> int:
        return await BODIES[style](account, amount)


class Account(Ledger.Model):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(primary_key=True)
    balance: Mapped[int]


# The ``core-prebuilt`` body's statements, built once: each execution then skips coercion and
# cache-key generation and finds its compiled form in the engine's cache.
_READ_BALANCE = select(Account.balance).where(Account.id == bindparam("account")).with_for_update()
_WRITE_BALANCE = (
    update(Account).where(Account.id == bindparam("account")).values(balance=bindparam("new_balance"))
)


# -- the hand-written side -------------------------------------------------------------------

# The framework's claim conditions (dbcore/delivery.py), minus precedence (none is declared),
# taken inside the handling transaction as hand-written queues do.
_CLAIM = """
    SELECT d.position, ev.id, ev.payload::text AS payload, ev.correlation_id
      FROM vms.deliveries d JOIN vms.events ev ON ev.position = d.position
     WHERE d.subscriber = 'ledger'
       AND d.xid < pg_snapshot_xmin(pg_current_snapshot())
       AND NOT EXISTS (
            SELECT 1 FROM vms.deliveries e
             WHERE e.subscriber = d.subscriber AND e.key = d.key
               AND (e.xid, e.position) < (d.xid, d.position))
     ORDER BY d.xid, d.position
     LIMIT 1
     FOR UPDATE OF d SKIP LOCKED
"""
_READ = "SELECT balance FROM ledger.accounts WHERE id = $1 FOR UPDATE"
_WRITE = "UPDATE ledger.accounts SET balance = $2 WHERE id = $1"
_EMIT = """
    INSERT INTO vms.events (id, type, key, payload, producer, correlation_id, causation_id)
    VALUES ($1, 'Bumped', $2, $3::jsonb, 'ledger', $4, $5)
"""
_MARK = "DELETE FROM vms.deliveries WHERE subscriber = 'ledger' AND position = $1"


async def raw_bump(
    conn: asyncpg.Connection, account: str, amount: int, correlation: str | None, cause: uuid.UUID | None
) -> int:
    balance: int = await conn.fetchval(_READ, account) + amount
    await conn.execute(_WRITE, account, balance)
    payload = json.dumps({"account": account, "balance": balance})
    await conn.execute(_EMIT, uuid.uuid4(), account, payload, correlation, cause)
    return balance


async def raw_handle_one(conn: asyncpg.Connection) -> bool:
    """Claim one event, handle it and mark it handled, in the caller's transaction."""
    row = await conn.fetchrow(_CLAIM)
    if row is None:
        return False
    event = json.loads(row["payload"])
    await raw_bump(conn, event["account"], event["amount"], row["correlation_id"], row["id"])
    await conn.execute(_MARK, row["position"])
    return True


# -- the run ---------------------------------------------------------------------------------


class _Inbound:
    """The inbound comparison on one database: a backlog drained by either side."""

    def __init__(self, bench: Bench, url: str, observer: asyncpg.Connection) -> None:
        self.bench = bench
        self.url = url
        self.observer = observer
        self.backlog = 0
        self.style = "driver"
        #: Per side: effects applied minus events handled (0 when each took effect once).
        self.mismatch: dict[str, int] = {
            side: 0 for side in (*(STYLES[s] for s in INBOUND_STYLES), TRACED, BASELINE)
        }

    async def enqueue(self, count: int) -> None:
        events = [Bump(account=f"a{i % ACCOUNTS}", amount=1, style=self.style) for i in range(count)]
        await log_events(self.observer, events)

    async def pending(self) -> int:
        count: int = await self.observer.fetchval(
            "SELECT count(*) FROM vms.deliveries WHERE subscriber = 'ledger'"
        )
        return count

    async def effects(self) -> int:
        total: int = await self.observer.fetchval("SELECT coalesce(sum(balance), 0) FROM ledger.accounts")
        return total

    async def calibrate(self, seconds: float) -> None:
        """Size the backlog from a short framework drain; both sides then drain that size."""
        async with App([Ledger], database_url=self.url):
            probe = await measure_drain(
                self.bench, "calibrating", 500, enqueue=self.enqueue, pending=self.pending
            )
        self.backlog = backlog_size(probe.rate, seconds)

    async def framework(self, round_: int, *, style: str) -> float:
        self.style = style
        async with App([Ledger], database_url=self.url):
            return await self._drain(STYLES[style], round_)

    async def traced(self, round_: int) -> float:
        self.style = "driver"
        with tracing_on():
            async with App([Ledger], database_url=self.url):
                return await self._drain(TRACED, round_)

    async def baseline(self, round_: int) -> float:
        async with (
            raw_pool(self.url) as pool,
            QueueWorkers(
                pool,
                asyncpg_connect_kwargs(self.url),
                concurrency=HANDLER_CONCURRENCY,
                channel=NOTIFY_CHANNEL,
                step=raw_handle_one,
            ),
        ):
            return await self._drain(BASELINE, round_)

    async def _drain(self, side: str, round_: int) -> float:
        before = await self.effects()
        result = await measure_drain(
            self.bench,
            f"{side} handler, round {round_ + 1}",
            self.backlog,
            enqueue=self.enqueue,
            pending=self.pending,
        )
        self.mismatch[side] += await self.effects() - before - WARMUP_EVENTS - self.backlog
        return result.rate


class _Direct:
    """The direct-call comparison: concurrent callers of one read-modify-write-and-send."""

    def __init__(self, bench: Bench, url: str, seconds: float) -> None:
        self.bench = bench
        self.url = url
        self.seconds = seconds

    @staticmethod
    def _accounts() -> list[Callable[[], str]]:
        """One seeded account picker per caller: the same sequence on both sides."""

        def picker(seed: int) -> Callable[[], str]:
            rng = random.Random(seed)
            return lambda: f"a{rng.randrange(ACCOUNTS)}"

        return [picker(seed) for seed in range(DIRECT_CONCURRENCY)]

    async def _measure(self, side: str, round_: int, call: Callable[[int], Awaitable[int]]) -> float:
        label = f"{side} direct call, round {round_ + 1}"
        return (await run_for(self.bench, label, self.seconds, DIRECT_CONCURRENCY, call)).rate

    async def framework(self, round_: int, *, style: str) -> float:
        pick = self._accounts()
        async with App([Ledger], database_url=self.url, workers=False) as app:
            ledger = app.service(Ledger)

            async def call(worker: int) -> int:
                await ledger.bump(pick[worker](), 1, style)
                return 1

            return await self._measure(STYLES[style], round_, call)

    async def baseline(self, round_: int) -> float:
        pick = self._accounts()
        async with raw_pool(self.url) as pool:

            async def call(worker: int) -> int:
                async with pool.acquire() as conn, conn.transaction():
                    await raw_bump(conn, pick[worker](), 1, None, None)
                return 1

            return await self._measure(BASELINE, round_, call)

    async def plain(self, round_: int, *, style: str) -> float:
        """The same body on plain SQLAlchemy: an engine like the App's, no framework."""
        pick = self._accounts()
        settings = Settings()
        engine = create_async_engine(self.url, pool_size=settings.pool_size, max_overflow=10)
        try:

            async def call(worker: int) -> int:
                if style == "orm":
                    async with AsyncSession(engine, expire_on_commit=False) as s, s.begin():
                        await plain_orm(s, pick[worker](), 1)
                else:
                    async with engine.begin() as conn:
                        await PLAIN_CORE[style](conn, pick[worker](), 1)
                return 1

            return await self._measure(PLAIN[style], round_, call)
        finally:
            await engine.dispose()


# -- the same code on plain SQLAlchemy, without the framework ---------------------------------

#: Side names of the plain-SQLAlchemy baselines, by style.
PLAIN = {
    "core": "SQLAlchemy Core alone",
    "core-prebuilt": "SQLAlchemy Core prebuilt alone",
    "orm": "SQLAlchemy ORM alone",
}


_EMIT_EVENT = insert(event_log)


def _bumped(account: str, balance: int) -> dict[str, object]:
    payload = Bumped(account=account, balance=balance).model_dump_json()
    return {"id": uuid.uuid4(), "type": "Bumped", "key": account, "payload": payload, "producer": "ledger"}


async def plain_core(conn: AsyncConnection, account: str, amount: int) -> int:
    read = select(Account.balance).where(Account.id == account).with_for_update()
    balance: int = (await conn.execute(read)).scalar_one() + amount
    await conn.execute(update(Account).where(Account.id == account).values(balance=balance))
    await conn.execute(insert(event_log).values(**_bumped(account, balance)))
    return balance


async def plain_core_prebuilt(conn: AsyncConnection, account: str, amount: int) -> int:
    balance: int = (await conn.execute(_READ_BALANCE, {"account": account})).scalar_one() + amount
    await conn.execute(_WRITE_BALANCE, {"account": account, "new_balance": balance})
    await conn.execute(_EMIT_EVENT, _bumped(account, balance))
    return balance


PLAIN_CORE = {"core": plain_core, "core-prebuilt": plain_core_prebuilt}


async def plain_orm(session: AsyncSession, account: str, amount: int) -> int:
    row = await session.get(Account, account, with_for_update=True)
    assert row is not None
    row.balance += amount
    await session.execute(insert(event_log).values(**_bumped(account, row.balance)))
    return row.balance


async def _prepare(url: str) -> None:
    async with (
        App([Ledger], database_url=url, create_tables=True, workers=False),
        admin_connection(url) as conn,
    ):
        await conn.execute(
            "INSERT INTO ledger.accounts (id, balance) SELECT 'a' || i, 0 FROM generate_series(0, $1) i",
            ACCOUNTS - 1,
        )


DIRECT_STYLES = ("driver", "core", "core-prebuilt", "orm")
#: The performance issue's targets against raw asyncpg (the ORM's: as high as SQLAlchemy goes).
DIRECT_TARGETS = {
    "driver": Target("min_ratio", 0.9),
    "core": Target("min_ratio", 0.5),
    "core-prebuilt": Target("min_ratio", 0.5),
}


async def run(bench: Bench) -> BenchmarkResult:
    phase = bench.phase_seconds(phases=len(INBOUND_STYLES) + len(DIRECT_STYLES) + len(PLAIN) + 3)
    async with bench.database() as url, admin_connection(url) as observer:
        await _prepare(url)
        inbound = _Inbound(bench, url, observer)
        await inbound.calibrate(phase)
        handled = await alternate(
            bench.rounds,
            {
                **{
                    STYLES[style]: functools.partial(inbound.framework, style=style)
                    for style in INBOUND_STYLES
                },
                TRACED: inbound.traced,
                BASELINE: inbound.baseline,
            },
        )
        direct = _Direct(bench, url, phase)
        called = await alternate(
            bench.rounds,
            {
                **{
                    STYLES[style]: functools.partial(direct.framework, style=style) for style in DIRECT_STYLES
                },
                **{side: functools.partial(direct.plain, style=style) for style, side in PLAIN.items()},
                BASELINE: direct.baseline,
            },
        )

    result = BenchmarkResult(NAME, DESCRIPTION)

    labels = {
        "driver": "same SQL on the driver",
        "core": "SQLAlchemy Core",
        "core-prebuilt": "SQLAlchemy Core, statements prebuilt",
        "orm": "SQLAlchemy ORM",
    }

    def compare(
        what: str, unit: str, rounds: dict[str, list[float]], style: str, target: Target | None = None
    ) -> Comparison:
        side = STYLES[style]
        return Comparison(
            f"{what}, {labels[style]}",
            unit,
            max(rounds[side]),
            max(rounds[BASELINE]),
            target=target,
            rounds={side: rounds[side], BASELINE: rounds[BASELINE]},
        )

    inbound_what = f"inbound handler, {HANDLER_CONCURRENCY} workers"
    direct_what = f"direct call, {DIRECT_CONCURRENCY} callers"
    result.comparisons = [
        compare(inbound_what, "events/s", handled, "driver", Target("min_ratio", 0.7)),
        compare(inbound_what, "events/s", handled, "core"),
        compare(inbound_what, "events/s", handled, "orm"),
        Comparison(
            f"{inbound_what}, tracing on vs off (same SQL on the driver)",
            "events/s",
            max(handled[TRACED]),
            max(handled[FRAMEWORK]),
            rounds={TRACED: handled[TRACED], FRAMEWORK: handled[FRAMEWORK]},
        ),
        *(
            compare(direct_what, "calls/s", called, style, DIRECT_TARGETS.get(style))
            for style in DIRECT_STYLES
        ),
        *(
            Comparison(
                f"direct call, {DIRECT_CONCURRENCY} callers, {labels[style]}: framework vs {side}",
                "calls/s",
                max(called[STYLES[style]]),
                max(called[side]),
                target=Target("min_ratio", 0.95),  # the framework adds nothing measurable
                rounds={STYLES[style]: called[STYLES[style]], side: called[side]},
            )
            for style, side in PLAIN.items()
        ),
        *(
            Comparison(
                f"direct call, {DIRECT_CONCURRENCY} callers, {side} vs raw asyncpg",
                "calls/s",
                max(called[side]),
                max(called[BASELINE]),
                rounds={side: called[side], BASELINE: called[BASELINE]},
            )
            for side in PLAIN.values()
        ),
    ]
    mismatch = inbound.mismatch
    framework_mismatch = sum(mismatch[side] for side in (*(STYLES[s] for s in INBOUND_STYLES), TRACED))
    result.checks = [
        Check(
            "effect mismatches (all styles)",
            framework_mismatch,
            mismatch[BASELINE],
            framework_mismatch == 0 and mismatch[BASELINE] == 0,
        )
    ]
    result.notes = [
        f"backlog of {inbound.backlog:,} events over {ACCOUNTS:,} keys; best of {bench.rounds} rounds",
        "both: READ COMMITTED, row read FOR UPDATE, outgoing event through the fan-out trigger",
        "handler body: the hand-written side's statements on the transaction's driver connection "
        "(target row), SQLAlchemy Core on connection(), or the ORM session",
        ANALYZE_NOTE,
    ]
    result.details = {"backlog": inbound.backlog, "accounts": ACCOUNTS, "phase_seconds": phase}
    return result
