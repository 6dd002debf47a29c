"""Services and helpers shared by the Kafka tests (G11).

``Shop`` produces ``Placed`` and ``Flagged``; ``Tally`` consumes them (``Placed`` with
``precedence=Flagged``) and ``Signup`` from an outside producer. Tally's handlers are not
idempotent (a counter increment, an appended row with no unique constraint), so an effect that
committed twice would show.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import BigInteger, Identity, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Event, Inbound, Outbound, Service, Transactional, send, session
from framework._internal.context import current

#: Upper bound of any single wait in the Kafka tests.
WAIT = 20.0


class Placed(Event, key="key"):
    key: str
    seq: int


class Flagged(Event, key="key"):
    key: str
    seq: int


class Tallied(Event, key="key"):
    key: str
    seq: int


class Signup(Event, key="user"):
    user: str
    plan: str


class Shop(Service, name="kshop"):
    @Outbound(Placed)
    @Transactional(type="RW")
    async def place(self, key: str, seq: int, *, hold: float = 0.0, fail: bool = False) -> None:
        session().add(Order(key=key, seq=seq))
        send(Placed(key=key, seq=seq))
        if hold:
            await session().flush()  # takes the transaction id now, commits after later ones
            await asyncio.sleep(hold)
        if fail:
            raise RuntimeError("the shop failed after placing")

    @Outbound(Flagged)
    @Transactional(type="RW")
    async def flag(self, key: str, seq: int) -> None:
        send(Flagged(key=key, seq=seq))


class Order(Shop.Model):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    key: Mapped[str]
    seq: Mapped[int]


class Tally(Service, name="ktally"):
    @Inbound(Placed, precedence=Flagged)
    @Outbound(Tallied)
    @Transactional(type="RW", isolation="read_committed")
    async def on_placed(self, ev: Placed) -> Tallied:
        s = session()
        # Not idempotent on purpose: a second commit of the same event adds one again.
        await s.execute(insert(Counter).values(id=ev.key, n=0).on_conflict_do_nothing())
        await s.execute(update(Counter).where(Counter.id == ev.key).values(n=Counter.n + 1))
        s.add(Seen(kind="placed", event_id=_event_id(), key=ev.key, seq=ev.seq))
        return Tallied(key=ev.key, seq=ev.seq)

    @Inbound(Flagged)
    @Transactional(type="RW", isolation="read_committed")
    async def on_flagged(self, ev: Flagged) -> None:
        s = session()
        placed = (await s.execute(select(func.count()).where(Seen.kind == "placed"))).scalar_one()
        # seq: how many Placed this service had handled when the Flagged came.
        s.add(Seen(kind="flagged", event_id=_event_id(), key=ev.key, seq=placed))

    @Inbound(Signup)
    @Transactional(type="RW", isolation="read_committed")
    async def on_signup(self, ev: Signup) -> None:
        session().add(Seen(kind="signup", event_id=_event_id(), key=ev.user, seq=0))


def _event_id() -> str:
    ctx = current()
    assert ctx is not None
    return str(ctx.causation_id)


class Counter(Tally.Model):
    __tablename__ = "counters"
    id: Mapped[str] = mapped_column(primary_key=True)
    n: Mapped[int]


class Seen(Tally.Model):
    """One row per committed handler run; no unique constraint, so duplicates would show."""

    __tablename__ = "seen"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str]
    event_id: Mapped[str]
    key: Mapped[str]
    seq: Mapped[int]


# -- helpers ---------------------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def rows(app: App, sql: str, **params: Any) -> list[Any]:
    async with app.core.admin() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def scalar(app: App, sql: str, **params: Any) -> Any:
    async with app.core.admin() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def seen(app: App, kind: str) -> list[tuple[str, str, int]]:
    """``(event_id, key, seq)`` of each committed run of ``kind``'s handler, in commit order."""
    found = await rows(app, "SELECT event_id, key, seq FROM ktally.seen WHERE kind = :k ORDER BY id", k=kind)
    return [(r.event_id, r.key, r.seq) for r in found]


async def partitions_of(bootstrap: str, topic: str, timeout: float = WAIT) -> list[TopicPartition]:
    """The partitions of ``topic``, once it exists (the relay creates it with its first message)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while topic not in await admin.list_topics():
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {topic} does not exist after {timeout} s")
            await asyncio.sleep(0.1)
        (described,) = await admin.describe_topics([topic])
        return [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    finally:
        await admin.close()


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float = WAIT) -> list[Any]:
    """At least ``count`` messages of ``topic`` from its beginning (all partitions), or fail.

    Each partition's messages keep their order; partitions follow one another.
    """
    deadline = time.monotonic() + timeout
    partitions = await partitions_of(bootstrap, topic, timeout)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        got: dict[int, list[Any]] = {p.partition: [] for p in partitions}
        while sum(len(v) for v in got.values()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{topic}: {sum(len(v) for v in got.values())} of {count} messages after {timeout} s"
                )
            for tp, messages in (await consumer.getmany(timeout_ms=200)).items():
                got[tp.partition].extend(messages)
        return [m for p in sorted(got) for m in got[p]]
    finally:
        await consumer.stop()


def headers(message: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in message.headers}
