"""Awaiting an outcome looks in the log only when a type it awaits commits in its correlation.

Every event of a chain shares its correlation: the core's notification names the event types
committed in each correlation, so the chain's other events cost a waiter no lookup. Lookups are
counted as the statements that reach the server, per correlation they ask about.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from dbcore.eventlog import EventRecord, append
from framework import App, Event


class Started(Event):
    tid: str


class Progressed(Event):
    tid: str


class Finished(Event):
    tid: str


class Odd(Event, name="odd,=|%7C type"):
    tid: str


class Lookups:
    """How many outcome lookups asked about each correlation."""

    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()

    def of(self, correlation_id: str) -> int:
        return self.asked[correlation_id]


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lookups]:
    counted = Lookups()
    original = asyncpg.Connection._execute

    async def execute(self: asyncpg.Connection, query: str, args: Any, *rest: Any, **kwargs: Any) -> Any:
        if "AS w(correlation_id, type)" in query:  # dbcore.eventlog.find_outcomes
            counted.asked.update(set(args[0]))
        return await original(self, query, args, *rest, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "_execute", execute)
    yield counted


@pytest.fixture
async def app(vmsdb_app_factory):  # type: ignore[no-untyped-def]
    async with vmsdb_app_factory([]) as started:
        yield started


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not come true")
        await asyncio.sleep(0.005)


async def waiting(
    app: App, lookups: Lookups, correlation_id: str, *awaited: type[Event]
) -> asyncio.Task[Event]:
    """A waiter, once its first look is done."""
    task = asyncio.create_task(app.outcome(correlation_id, *awaited, timeout=10))
    await until(lambda: lookups.of(correlation_id) >= 1)
    return task


async def all_notifications_read(app: App, lookups: Lookups) -> None:
    """Until the App has read every notification sent so far: they arrive in commit order on one
    connection, so once a later one has woken its own waiter, the earlier ones were read too."""
    sentinel = f"sentinel-{uuid.uuid4()}"
    waiter = await waiting(app, lookups, sentinel, Finished)
    await app.publish(Finished(tid=sentinel), correlation_id=sentinel)
    assert await waiter == Finished(tid=sentinel)


async def test_the_chains_other_events_cost_a_waiter_no_lookup(app: App, lookups: Lookups) -> None:
    waiter = await waiting(app, lookups, "tid-1", Finished)
    await app.publish(Started(tid="1"), correlation_id="tid-1")
    for _ in range(3):
        await app.publish(Progressed(tid="1"), correlation_id="tid-1")
    await all_notifications_read(app, lookups)
    assert lookups.of("tid-1") == 1  # the first look only
    assert not waiter.done()
    await app.publish(Finished(tid="1"), correlation_id="tid-1")
    assert await waiter == Finished(tid="1")
    assert lookups.of("tid-1") == 2  # and one for the type it awaits


async def test_a_batch_too_long_to_list_looks_at_every_waiter(app: App, lookups: Lookups) -> None:
    """A notification lists its correlations only while they fit (payloads stay under 8000 bytes);
    past that it says '*', and every waiter looks, its correlation named or not."""
    bystander = await waiting(app, lookups, "tid-bystander", Finished)
    waiter = await waiting(app, lookups, "tid-in-a-crowd", Finished)
    crowd = [f"tid-crowd-{i:04d}-{'x' * 20}" for i in range(300)] + ["tid-in-a-crowd"]
    records = [
        EventRecord(uuid.uuid4(), Finished.event_type(), None, Finished(tid=c).model_dump_json(), None, c)
        for c in crowd
    ]
    async with app.core.admin() as conn:  # one statement: one notification for all of them
        await append(conn, records)
    assert await waiter == Finished(tid="tid-in-a-crowd")
    await until(lambda: lookups.of("tid-bystander") >= 2)  # looked again, though not named
    assert not bystander.done()
    bystander.cancel()


async def test_names_with_the_lists_separators_are_read_back_whole(app: App, lookups: Lookups) -> None:
    """Correlations and event types may hold ',', '=', '|' and '%': the notification escapes
    them, so neither a waiter of a piece of the name nor one of another type is woken."""
    weird = "tid,with=odd|chars%2C"
    waiter = await waiting(app, lookups, weird, Odd)
    pieces = {piece: await waiting(app, lookups, piece, Odd) for piece in ("tid", "with", "chars,")}
    await app.publish(Odd(tid="w"), correlation_id=weird)
    assert await waiter == Odd(tid="w")
    await all_notifications_read(app, lookups)
    assert lookups.of(weird) == 2
    assert {piece: lookups.of(piece) for piece in pieces} == dict.fromkeys(pieces, 1)
    for task in pieces.values():
        task.cancel()
