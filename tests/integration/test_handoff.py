"""Hand-offs (framework._internal.handoff): an event handled in the App that sent it goes to a
worker without a notification and a claim, and only when the dispatcher's own claim would have
taken it at once; exactly once and in order either way. The kill -9 case is in
``test_crash_recovery.py``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import BigInteger, Identity, text
from sqlalchemy.orm import Mapped, mapped_column

from dbcore.eventlog import HANDOFF_SECONDS, NOTIFY_CHANNEL
from framework import App, Event, Inbound, Outbound, Service, Transactional, send, session


class Bumped(Event, key="key"):
    key: str
    n: int


class Opened(Event, key="key"):
    key: str


class Closed(Event, key="key"):
    key: str


class Counter(Service, name="counter"):
    @Outbound(Bumped)
    @Transactional(type="RW")
    async def bump(self, key: str, n: int) -> None:
        send(Bumped(key=key, n=n))

    @Outbound([Opened, Closed])
    @Transactional(type="RW")
    async def open_and_close(self, key: str) -> None:
        send(Opened(key=key))
        send(Closed(key=key))

    @Outbound(Opened)
    @Transactional(type="RW")
    async def open_only(self, key: str) -> None:
        send(Opened(key=key))

    @Outbound(Bumped)
    @Transactional(type="RW")
    async def bump_keys(self, keys: list[str]) -> None:
        for key in keys:
            send(Bumped(key=key, n=1))

    @Outbound(Bumped)
    @Transactional(type="RW")
    async def bump_many(self, key: str, count: int) -> None:
        """Several events of one key in one transaction: the first is handed off, the rest
        wait behind it."""
        for n in range(1, count + 1):
            send(Bumped(key=key, n=n))


class Ledger(Service, name="ledger"):
    @Inbound(Bumped)
    @Transactional(type="RW")
    async def on_bumped(self, ev: Bumped) -> None:
        # Not idempotent: a second commit of one event adds a second row.
        session().add(Entry(key=ev.key, n=ev.n))


class Grouped(Service, name="grouped"):
    """Runs up to eight deliveries in one transaction, acknowledged by one statement."""

    @Inbound(Bumped, group_commit=8)
    @Transactional(type="RW")
    async def on_bumped(self, ev: Bumped) -> None:
        session().add(GroupedEntry(key=ev.key, n=ev.n))


class GroupedEntry(Grouped.Model):
    __tablename__ = "entries"
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    key: Mapped[str]
    n: Mapped[int]
    #: The handling transaction: deliveries run in one group share it.
    xid: Mapped[int] = mapped_column(BigInteger, server_default=text("txid_current()"))


#: Slow's handler sets "started" and waits for "release".
HOLD: dict[str, asyncio.Event] = {}


class Slow(Service, name="slow"):
    """Holds its handler while the test asks, past a hand-off claim's first lease."""

    @Inbound(Bumped)
    @Transactional(type="RW")
    async def on_bumped(self, ev: Bumped) -> None:
        HOLD["started"].set()
        await asyncio.wait_for(HOLD["release"].wait(), 30)
        session().add(SlowEntry(key=ev.key, n=ev.n))


class SlowEntry(Slow.Model):
    __tablename__ = "entries"
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    key: Mapped[str]
    n: Mapped[int]


class Auditor(Service, name="auditor"):
    """Handles Closed only after every earlier Opened (precedence), whatever the key."""

    @Inbound(Opened, precedence=Closed)
    @Transactional(type="RW")
    async def on_opened(self, ev: Opened) -> None:
        pass

    @Inbound(Closed)
    @Transactional(type="RW")
    async def on_closed(self, ev: Closed) -> None:
        pass


class Entry(Ledger.Model):
    __tablename__ = "entries"
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    key: Mapped[str]
    n: Mapped[int]


POLL = 60.0  # no fallback poll in these tests: what is handled was handed off or notified


async def entries(app: App) -> dict[str, list[int]]:
    """Each key's handled ``n``, in the order the handlers committed."""
    async with app.core.admin() as conn:
        rows = (await conn.execute(text("SELECT key, n FROM ledger.entries ORDER BY seq"))).all()
    by_key: dict[str, list[int]] = defaultdict(list)
    for key, n in rows:
        by_key[key].append(n)
    return dict(by_key)


def handed_off_to(app: App, service: str) -> int:
    return int(app.metrics.value("deliveries_handed_off", service=service))


def handed_off(app: App) -> int:
    return handed_off_to(app, "ledger")


@asynccontextmanager
async def notified(app: App) -> AsyncIterator[list[str]]:
    """The subscribers named by each event notification sent while the block runs."""
    seen: list[str] = []
    engine = app.core.engine
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    conn = await asyncpg.connect(*args, **kwargs)
    await conn.add_listener(NOTIFY_CHANNEL, lambda *a: seen.append(a[-1].partition("\n")[0]))
    try:
        yield seen
    finally:
        await conn.close()


async def test_an_event_handled_in_its_own_app_is_handed_off(vmsdb_app_factory: Any) -> None:
    async with (
        vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app,
        notified(app) as notifications,
    ):
        await app.service(Counter).bump("k", 1)
        await app.drain()
        assert await entries(app) == {"k": [1]}
        assert handed_off(app) == 1
        async with app.core.admin() as conn:
            claim = (await conn.execute(text("SELECT handoff_to, handoff_claim FROM vms.events"))).one()
        await asyncio.sleep(0.1)
    assert claim.handoff_to == "ledger" and claim.handoff_claim is not None
    assert not any("ledger" in line.split(",") for line in notifications), notifications


async def test_events_of_one_key_in_one_transaction_run_in_order(vmsdb_app_factory: Any) -> None:
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        await app.service(Counter).bump_many("k", 5)
        await app.drain()
        assert await entries(app) == {"k": [1, 2, 3, 4, 5]}
        assert handed_off(app) == 1  # the first; each of the others followed the one before


async def test_no_hand_off_while_an_older_transaction_is_open(vmsdb_app_factory: Any) -> None:
    """An older transaction could still commit an earlier event: the delivery is left to the
    dispatcher's claim, which waits for that transaction to end (G3)."""
    async with (
        vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app,
        notified(app) as notifications,
    ):
        async with app.core.admin() as older:
            await older.execute(text("SELECT pg_current_xact_id()"))  # holds an xid, open
            await app.service(Counter).bump("k", 1)
            await asyncio.sleep(0.3)
            assert await entries(app) == {}  # behind the horizon
        await app.drain()
        assert await entries(app) == {"k": [1]}
        assert handed_off(app) == 0
        await asyncio.sleep(0.1)
    assert any("ledger" in line.split(",") for line in notifications), notifications


async def test_no_hand_off_behind_a_waiting_delivery_of_the_same_key(vmsdb_app_factory: Any) -> None:
    """A delivery of the same key still waiting (here: an earlier event whose retry is not due
    yet) comes first: the new one is not handed off, and runs after it (G5)."""
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=0.05) as app:
        async with app.core.admin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO vms.events (id, type, key, payload, producer) "
                    "VALUES (gen_random_uuid(), 'Bumped', 'k', '{\"key\": \"k\", \"n\": 1}', 'counter')"
                )
            )
            await conn.execute(text("UPDATE vms.deliveries SET available_at = now() + interval '0.5 s'"))
        await app.service(Counter).bump("k", 2)
        await app.drain()
        assert await entries(app) == {"k": [1, 2]}
        assert handed_off(app) == 0


async def test_concurrent_producers_each_event_once_and_in_order(vmsdb_app_factory: Any) -> None:
    """Many callers on few keys: some deliveries handed off, some claimed; every event runs
    once, each key's in the order they were sent."""
    keys, per_key = 4, 15
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=0.05) as app:
        counter = app.service(Counter)

        async def sender(key: str) -> None:
            for n in range(1, per_key + 1):
                await counter.bump(key, n)

        await asyncio.gather(*(sender(f"k{i}") for i in range(keys)))
        await app.drain()
        assert await entries(app) == {f"k{i}": list(range(1, per_key + 1)) for i in range(keys)}
        assert handed_off(app) > 0


async def test_no_hand_off_of_an_event_that_waits_for_a_precedence(vmsdb_app_factory: Any) -> None:
    """Closed waits for earlier Opened deliveries (``precedence=``), which only the dispatcher's
    claim checks: it is never handed off, and neither is anything else the same transaction
    sends the auditor (an Opened of the key could have to come after a Closed of it)."""
    async with vmsdb_app_factory([Counter, Auditor], poll_interval=POLL) as app:
        await app.service(Counter).open_and_close("k")
        await app.drain()
        async with app.core.admin() as conn:
            marked = dict((await conn.execute(text("SELECT type, handoff_to FROM vms.events"))).all())
    assert marked == {"Opened": None, "Closed": None}  # Closed in the same transaction: neither


async def test_an_event_that_waits_for_nothing_is_handed_off_beside_no_waiting_one(
    vmsdb_app_factory: Any,
) -> None:
    async with vmsdb_app_factory([Counter, Auditor], poll_interval=POLL) as app:
        await app.service(Counter).open_only("k")
        await app.drain()
        async with app.core.admin() as conn:
            marked = dict((await conn.execute(text("SELECT type, handoff_to FROM vms.events"))).all())
    assert marked == {"Opened": "auditor"}


async def test_handed_off_deliveries_run_in_a_group_commit_once_each(vmsdb_app_factory: Any) -> None:
    """Deliveries of several keys handed off together are queued together: the worker runs them
    in one transaction and acknowledges them by their events (vms.ack_event), once each."""
    keys = [f"k{i}" for i in range(6)]
    async with vmsdb_app_factory([Counter, Grouped], poll_interval=POLL) as app:
        await app.service(Counter).bump_keys(keys)
        await app.drain()
        assert handed_off_to(app, "grouped") == len(keys)
        async with app.core.admin() as conn:
            rows = (await conn.execute(text("SELECT key, n FROM grouped.entries ORDER BY key"))).all()
            transactions = (
                await conn.execute(text("SELECT count(DISTINCT xid) FROM grouped.entries"))
            ).scalar_one()
            pending = (await conn.execute(text("SELECT count(*) FROM vms.deliveries"))).scalar_one()
    assert [tuple(r) for r in rows] == [(k, 1) for k in keys]
    assert pending == 0
    assert transactions < len(keys)  # grouped


async def test_a_handed_off_claim_is_renewed_while_its_handler_runs(vmsdb_app_factory: Any) -> None:
    """The heartbeat renews a handed-off delivery's claim (found by its event): held past the
    claim's first lease, it is still the producer's claim, not taken over by a new one."""
    HOLD.update(started=asyncio.Event(), release=asyncio.Event())
    async with vmsdb_app_factory([Counter, Slow], poll_interval=0.05) as app:
        await app.service(Counter).bump("k", 1)
        await asyncio.wait_for(HOLD["started"].wait(), 10)
        await asyncio.sleep(HANDOFF_SECONDS + 1.0)
        async with app.core.admin() as conn:
            (same,) = (
                await conn.execute(
                    text(
                        "SELECT d.claim = e.handoff_claim FROM vms.deliveries d "
                        "JOIN vms.events e ON e.position = d.position"
                    )
                )
            ).one()
        HOLD["release"].set()
        await app.drain()
        assert handed_off_to(app, "slow") == 1
        async with app.core.admin() as conn:
            rows = (await conn.execute(text("SELECT key, n FROM slow.entries"))).all()
    assert same
    assert [tuple(r) for r in rows] == [("k", 1)]
