"""``leases``: ``@Lease`` grants and settlements on hot items, against ``SELECT ... FOR UPDATE``.

Many concurrent callers each loop: pick one of 100 items, take a lease of one unit, then consume
it (a sale) or release it (an abandoned cart). Every call is its own transaction on both sides;
an operation is one call (a grant, refused or not, a consume or a release). Both sides do the
same fixed, seeded work per round; stock is sized so that the 20 lowest of the 100 items sell out
during a round, and grants at that boundary are refused under contention. After each round, on
each side: no item below zero, and the units gone from stock equal the consumes the callers saw
(no oversell, no lost update).

The baseline is the hand-written reservation: in one transaction ``SELECT qty ... FOR UPDATE``,
decrement it and insert a lease row; consume marks the row; release marks it and puts the unit
back. It has no expiry without a reaper, no idempotent settle checks and no roles; the framework
does its work in one pushed-down ``SECURITY DEFINER`` function call per operation.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Lease, LeaseGrant, Service
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
    raw_pool,
    run_fixed,
    run_for,
)

NAME = "leases"
DESCRIPTION = "@Lease grant/consume/release on 100 hot items vs SELECT ... FOR UPDATE + decrement"
DEFAULT_SECONDS = 12.0

ITEMS = 100
CALLERS = 32
CONSUME_SHARE = 0.5  # of granted leases; the rest are released
PERIOD = timedelta(minutes=5)  # longer than any run: nothing expires


class Depot(Service, name="depot"):
    @Lease("FROM Item i WHERE i.id = :item_id FOR UPDATE DECREMENT i.qty BY :qty WITH PERIOD :period")
    async def hold(self, item_id: str, qty: int, period: timedelta) -> LeaseGrant | None: ...


class Item(Depot.Model):
    __tablename__ = "items"
    id: Mapped[str] = mapped_column(primary_key=True)
    qty: Mapped[int]


# -- the hand-written side -------------------------------------------------------------------

_SCHEMA = (
    "CREATE SCHEMA rawl",
    "CREATE TABLE rawl.items (id text PRIMARY KEY, qty integer NOT NULL)",
    """
    CREATE TABLE rawl.leases (
        id uuid PRIMARY KEY, item_id text NOT NULL, qty integer NOT NULL, status text NOT NULL,
        expires_at timestamptz NOT NULL, ended_at timestamptz)
    """,
)
_LOCK = "SELECT qty FROM rawl.items WHERE id = $1 FOR UPDATE"
_TAKE = "UPDATE rawl.items SET qty = qty - $2 WHERE id = $1"
_RECORD = (
    "INSERT INTO rawl.leases (id, item_id, qty, status, expires_at) VALUES ($1, $2, $3, 'active', now() + $4)"
)
_CONSUME = "UPDATE rawl.leases SET status = 'consumed', ended_at = now() WHERE id = $1 AND status = 'active'"
_RELEASE = """
    UPDATE rawl.leases SET status = 'released', ended_at = now()
     WHERE id = $1 AND status = 'active' RETURNING item_id, qty
"""
_GIVE_BACK = "UPDATE rawl.items SET qty = qty + $2 WHERE id = $1"


async def raw_grant(pool: asyncpg.Pool, item_id: str, qty: int) -> uuid.UUID | None:
    async with pool.acquire() as conn, conn.transaction():
        on_hand = await conn.fetchval(_LOCK, item_id)
        if on_hand is None or on_hand < qty:
            return None
        lease_id = uuid.uuid4()
        await conn.execute(_TAKE, item_id, qty)
        await conn.execute(_RECORD, lease_id, item_id, qty, PERIOD)
        return lease_id


async def raw_consume(pool: asyncpg.Pool, lease_id: uuid.UUID) -> None:
    async with pool.acquire() as conn:
        await conn.execute(_CONSUME, lease_id)


async def raw_release(pool: asyncpg.Pool, lease_id: uuid.UUID) -> None:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_RELEASE, lease_id)
        if row is not None:
            await conn.execute(_GIVE_BACK, row["item_id"], row["qty"])


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the callers of one side saw, over all rounds."""

    grants: int = 0
    refusals: int = 0
    consumes: int = 0
    releases: int = 0
    oversold_units: int = 0  # units below zero on some item at the end of a round
    lost_units: int = 0  # |units gone from stock - consumes seen|, summed over rounds


@dataclass(frozen=True)
class Operations:
    """One side's three operations; a lease is whatever that side's grant returns."""

    grant: Callable[[str], Awaitable[object | None]]
    consume: Callable[[object], Awaitable[None]]
    release: Callable[[object], Awaitable[None]]


class _Leases:
    """Both sides do the same fixed work per round: ``cycles`` grant-then-settle cycles."""

    WARMUP_CYCLES = 5  # per caller, before each measured round (connections, statements)

    def __init__(self, bench: Bench, url: str, observer: asyncpg.Connection) -> None:
        self.bench = bench
        self.url = url
        self.observer = observer
        self.cycles = CALLERS * 20
        self.stock: dict[str, int] = {}
        self.tally = {FRAMEWORK: Tally(), BASELINE: Tally()}

    def size(self, cycles_per_second: float, seconds: float) -> None:
        """Work for about ``seconds``; stock such that the 20 lowest items sell out in a round."""
        per_caller = max(20, round(cycles_per_second * seconds / CALLERS))
        self.cycles = per_caller * CALLERS
        consumed_per_item = self.cycles * CONSUME_SHARE / ITEMS
        self.stock = {f"i{n}": max(1, round(consumed_per_item * (n + 1) / 20)) for n in range(ITEMS)}

    async def restock(self, table: str, leases: str) -> None:
        async with self.observer.transaction():
            await self.observer.execute(f"DELETE FROM {leases}")
            await self.observer.execute(f"DELETE FROM {table}")
            await self.observer.executemany(
                f"INSERT INTO {table} (id, qty) VALUES ($1, $2)", list(self.stock.items())
            )

    async def calibrate(self, seconds: float) -> None:
        """Size the work from a short framework run on plenty of stock."""
        self.stock = {f"i{n}": 1_000_000 for n in range(ITEMS)}
        await self.restock("depot.items", "vms.leases")
        async with self._framework() as ops:
            probe = await run_for(self.bench, "calibrating", seconds, CALLERS, self._cycle(Tally(), ops))
        self.size(probe.rate / 2, self.bench.phase_seconds(phases=2))

    @contextlib.asynccontextmanager
    async def _framework(self) -> AsyncIterator[Operations]:
        async with App([Depot], database_url=self.url, workers=False) as app:
            depot = app.service(Depot)

            async def grant(item_id: str) -> object | None:
                return await depot.hold(item_id, 1, PERIOD)

            async def consume(lease: object) -> None:
                assert isinstance(lease, LeaseGrant)
                await app.leases.consume(lease)

            async def release(lease: object) -> None:
                assert isinstance(lease, LeaseGrant)
                await app.leases.release(lease)

            yield Operations(grant, consume, release)

    @contextlib.asynccontextmanager
    async def _baseline(self) -> AsyncIterator[Operations]:
        async with raw_pool(self.url) as pool:

            async def grant(item_id: str) -> object | None:
                return await raw_grant(pool, item_id, 1)

            async def consume(lease: object) -> None:
                assert isinstance(lease, uuid.UUID)
                await raw_consume(pool, lease)

            async def release(lease: object) -> None:
                assert isinstance(lease, uuid.UUID)
                await raw_release(pool, lease)

            yield Operations(grant, consume, release)

    async def framework(self, round_: int) -> float:
        async with self._framework() as ops:
            return await self._round(FRAMEWORK, round_, "depot.items", "vms.leases", ops)

    async def baseline(self, round_: int) -> float:
        async with self._baseline() as ops:
            return await self._round(BASELINE, round_, "rawl.items", "rawl.leases", ops)

    @staticmethod
    def _cycle(tally: Tally, ops: Operations, seed: int = 0) -> Callable[[int], Awaitable[int]]:
        """One caller's cycle: grant one unit of a random item, then consume or release it."""
        # Seeded per caller: both sides see the same sequence of items and decisions.
        rngs = [random.Random(seed * 1_000 + caller) for caller in range(CALLERS)]

        async def cycle(caller: int) -> int:
            rng = rngs[caller]
            lease = await ops.grant(f"i{rng.randrange(ITEMS)}")
            if lease is None:
                tally.refusals += 1
                return 1
            tally.grants += 1
            if rng.random() < CONSUME_SHARE:
                await ops.consume(lease)
                tally.consumes += 1
            else:
                await ops.release(lease)
                tally.releases += 1
            return 2

        return cycle

    async def _round(self, side: str, round_: int, table: str, leases: str, ops: Operations) -> float:
        """Warm up, restock, run the fixed work, then check the stock against what callers saw."""
        warmup = self._cycle(Tally(), ops)
        await run_fixed(self.bench, f"{side} warm-up", CALLERS, self.WARMUP_CYCLES, warmup)
        await self.restock(table, leases)
        tally = self.tally[side]
        consumes_before = tally.consumes
        label = f"{side} leases, {CALLERS} callers, round {round_ + 1}"
        result = await run_fixed(
            self.bench, label, CALLERS, self.cycles // CALLERS, self._cycle(tally, ops, seed=round_ + 1)
        )
        rows = await self.observer.fetch(f"SELECT id, qty FROM {table}")
        tally.oversold_units += sum(max(0, -r["qty"]) for r in rows)
        gone = sum(self.stock[r["id"]] - r["qty"] for r in rows)
        tally.lost_units += abs(gone - (tally.consumes - consumes_before))
        return result.rate


async def _prepare(url: str, observer: asyncpg.Connection) -> None:
    async with App([Depot], database_url=url, create_tables=True, workers=False):
        pass
    for statement in _SCHEMA:
        await observer.execute(statement)


async def run(bench: Bench) -> BenchmarkResult:
    async with bench.database() as url, connection(url) as observer:
        await _prepare(url, observer)
        leases = _Leases(bench, url, observer)
        await leases.calibrate(1.0)
        rates = await alternate(bench.rounds, {FRAMEWORK: leases.framework, BASELINE: leases.baseline})

    fw, raw = leases.tally[FRAMEWORK], leases.tally[BASELINE]
    result = BenchmarkResult(NAME, DESCRIPTION)
    result.comparisons = [
        Comparison(
            f"lease ops, {CALLERS} callers",
            "ops/s",
            max(rates[FRAMEWORK]),
            max(rates[BASELINE]),
            target=Target("min_value", 1_000),
            rounds=rates,
        )
    ]
    result.checks = [
        Check(
            "oversold units",
            fw.oversold_units,
            raw.oversold_units,
            fw.oversold_units == 0 == raw.oversold_units,
        ),
        Check("unaccounted units", fw.lost_units, raw.lost_units, fw.lost_units == 0 == raw.lost_units),
    ]
    refused = {side: t.refusals / max(1, t.refusals + t.grants) for side, t in leases.tally.items()}
    result.notes = [
        f"{leases.cycles:,} grant-then-settle cycles per round on each side (same seeded sequence); "
        f"{CONSUME_SHARE:.0%} of grants consumed, the rest released",
        f"stock {min(leases.stock.values())}..{max(leases.stock.values())} units per item, the 20 lowest "
        f"sell out; grants refused: {FRAMEWORK} {refused[FRAMEWORK]:.1%}, {BASELINE} {refused[BASELINE]:.1%}",
        f"an operation is one call in its own transaction; best of {bench.rounds} rounds",
    ]
    result.details = {
        "tally": {side: vars(t) for side, t in leases.tally.items()},
        "cycles_per_round": leases.cycles,
        "stock": leases.stock,
        "callers": CALLERS,
        "items": ITEMS,
    }
    return result
