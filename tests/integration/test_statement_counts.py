"""The framework's statement diet, pinned: statements and round trips per direct call, per handled
event and per awaited outcome. No timings: a count that grows is a regression someone pays for on
every transaction (issue 14).

Every statement is recorded where it leaves for the server, with the asyncio task that sent it:
SQLAlchemy's (its ``before_cursor_execute`` event, for every engine) and the framework's own on
the asyncpg driver (``Connection.execute``, ``fetch`` & co., patched for the test). A message of
several statements (``BEGIN ...; SET LOCAL ROLE ...``) is one round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from framework import (
    App,
    Event,
    Inbound,
    Outbound,
    ReadOnlyViolation,
    Service,
    Transactional,
    correlate,
    send,
    session,
)


class Bumped(Event, key="key"):
    key: str
    n: int


class Tallied(Event, key="key"):
    key: str


class Counter(Service, name="counter"):
    @Outbound(Bumped)
    @Transactional(type="RW")
    async def bump(self, key: str) -> int:
        """The README's read-modify-write with the ORM, sending one event."""
        row = await session().get(Tally, key)
        if row is None:
            row = Tally(key=key, n=0)
            session().add(row)
        row.n += 1
        send(Bumped(key=key, n=row.n))
        return row.n

    @Transactional(type="RO")
    async def peek(self, key: str) -> int | None:
        """A one-statement read: read committed and read-only, so no transaction around it."""
        row = await session().get(Tally, key)
        return None if row is None else row.n

    @Outbound(Bumped)
    @Transactional(type="RO")
    async def sneak(self, key: str) -> None:
        """A read-only call that sends an event: refused, as a write."""
        send(Bumped(key=key, n=-1))


@Counter.export
class Tally(Counter.Model):
    __tablename__ = "tallies"
    key: Mapped[str] = mapped_column(primary_key=True)
    n: Mapped[int]


class Ledger(Service, name="ledger"):
    @Inbound(Bumped)
    @Outbound(Tallied)
    @Transactional(type="RW")
    async def on_bumped(self, ev: Bumped) -> None:
        """A handler that inserts one row with the ORM and sends one event."""
        session().add(Entry(key=ev.key, n=ev.n))
        send(Tallied(key=ev.key))


class Entry(Ledger.Model):
    __tablename__ = "entries"
    key: Mapped[str] = mapped_column(primary_key=True)
    n: Mapped[int] = mapped_column(primary_key=True)


T = TypeVar("T")


@dataclass
class Sent:
    task: str
    sql: str

    @property
    def statements(self) -> int:
        return len([s for s in self.sql.split(";") if s.strip()])


@dataclass
class Recorder:
    sent: list[Sent] = field(default_factory=list)

    def note(self, sql: str) -> None:
        task = asyncio.current_task()
        self.sent.append(Sent("" if task is None else task.get_name(), sql))

    def of(self, prefix: str) -> list[Sent]:
        return [s for s in self.sent if s.task.startswith(prefix)]

    async def mine(self, call: Awaitable[T]) -> tuple[T, list[Sent]]:
        """``call``'s result, and what this task sent while awaiting it (nothing before)."""
        self.sent.clear()
        me = asyncio.current_task()
        assert me is not None
        result = await call
        return result, self.of(me.get_name())


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder()

    def sqlalchemy_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        recorder.note(statement)

    # Only the driver's entry points that send a statement of their own: execute() with
    # arguments, fetch() & co. all go through _execute.
    original_execute = asyncpg.Connection.execute
    original_private = asyncpg.Connection._execute

    async def execute(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        if not args:
            recorder.note(query)
        return await original_execute(self, query, *args, **kwargs)

    async def private(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        recorder.note(query)
        return await original_private(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", execute)
    monkeypatch.setattr(asyncpg.Connection, "_execute", private)
    event.listen(Engine, "before_cursor_execute", sqlalchemy_statement)
    try:
        yield recorder
    finally:
        event.remove(Engine, "before_cursor_execute", sqlalchemy_statement)


def totals(sent: list[Sent]) -> tuple[int, int]:
    """(round trips, statements)."""
    return len(sent), sum(s.statements for s in sent)


async def settle(app: App) -> None:
    await app.drain()
    await asyncio.sleep(0.2)  # anything the dispatcher would still send, included


# Today's counts; lower them when a change saves a statement, never raise them.
# A direct call: BEGIN + role, the ORM's SELECT and UPDATE, the outbox with COMMIT. Before
# issue 14: 5 and 6 (the outbox a round trip of its own).
DIRECT_CALL = (4, 6)
# A handled event: the claim (with its own horizon check), the handler's transaction (BEGIN +
# role, the ORM's INSERT, the outbox with ack and COMMIT). Before issue 14: 6 and 8 (a
# held-back check after every claim, the outbox a round trip of its own).
HANDLED_EVENT = (4, 7)
# A handed-off event (framework._internal.handoff): the handler's transaction alone (BEGIN, the
# ORM's INSERT, the ack and outbox with COMMIT); the claim, and its round trip, are gone.
HANDED_OFF_EVENT = (3, 5)
# Awaiting an outcome: one lookup for the waiter, one for the notification that names its
# correlation with a type it awaits. Before the notification named the types: one more for
# each other event of the chain (they all share its correlation).
OUTCOME_WAIT = 2
POLL = 60.0


async def test_a_direct_call_costs_what_it_did(vmsdb_app_factory: Any, recorder: Recorder) -> None:
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        for _ in range(2):  # warm: prepared statements, the ORM's compiled cache
            await app.service(Counter).bump("warm")
        await settle(app)
        bumped, mine = await recorder.mine(app.service(Counter).bump("warm"))
        assert bumped == 3
        await settle(app)
    round_trips, statements = totals(mine)
    assert round_trips <= DIRECT_CALL[0] and statements <= DIRECT_CALL[1], [s.sql for s in mine]


async def test_a_read_only_read_committed_call_is_one_round_trip(
    vmsdb_app_factory: Any, recorder: Recorder
) -> None:
    """No BEGIN and no COMMIT around a read: each statement has its own snapshot at read
    committed anyway, and the service's login is read-only unless a transaction says otherwise."""
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        await app.service(Counter).bump("read")
        await app.service(Counter).peek("read")  # warm
        await settle(app)
        peeked, mine = await recorder.mine(app.service(Counter).peek("read"))
        assert peeked == 1
        with pytest.raises(ReadOnlyViolation):
            await app.service(Counter).sneak("read")
        async with app.core.admin() as conn:
            bumped = text("SELECT count(*) FROM vms.events WHERE key = 'read' AND type = 'Bumped'")
            logged = (await conn.execute(bumped)).scalar()
    assert totals(mine) == (1, 1), [s.sql for s in mine]
    assert logged == 1  # the bump's event; the read-only call's was refused


async def test_a_services_outbox_is_planned_once_per_connection(
    vmsdb_app_factory: Any, recorder: Recorder
) -> None:
    """The outbox sent with COMMIT executes the statement the service's connection prepared when
    it was opened: the server does not plan the insert, row-level security policy included, in
    every transaction."""
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        await app.service(Counter).bump("warm")
        await settle(app)
        _, mine = await recorder.mine(app.service(Counter).bump("warm"))
        commits = [s.sql for s in mine if "; COMMIT" in s.sql]
        await settle(app)
    assert len(commits) == 1 and commits[0].startswith("EXECUTE vms_outbox("), commits


async def test_a_handled_event_costs_what_it_did(vmsdb_app_factory: Any, recorder: Recorder) -> None:
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        for _ in range(2):
            await app.service(Counter).bump("warm")
            await settle(app)
        recorder.sent.clear()
        await app.publish(Bumped(key="published", n=1))
        await settle(app)
    framework = recorder.of("vmsdb-dispatch-ledger") + recorder.of("vmsdb-handler-")
    round_trips, statements = totals(framework)
    assert round_trips <= HANDLED_EVENT[0] and statements <= HANDLED_EVENT[1], [s.sql for s in framework]


async def test_an_event_handed_off_in_its_own_app_costs_no_claim(
    vmsdb_app_factory: Any, recorder: Recorder
) -> None:
    """The direct call's Bumped goes to Ledger in the same App: a hand-off, so the delivery costs
    the handler's transaction only (BEGIN, the ORM's INSERT, the ack and outbox with COMMIT), no
    notification-driven claim."""
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        for _ in range(2):
            await app.service(Counter).bump("warm")
            await settle(app)
        recorder.sent.clear()
        await app.service(Counter).bump("handed")
        await settle(app)
        assert app.metrics.value("deliveries_handed_off", service="ledger") == 3
    claims = recorder.of("vmsdb-claims") + recorder.of("vmsdb-dispatch-ledger")
    handler = recorder.of("vmsdb-handler-")
    assert claims == [], [s.sql for s in claims]
    assert totals(handler) == (HANDED_OFF_EVENT[0], HANDED_OFF_EVENT[1]), [s.sql for s in handler]


async def test_an_outcome_wait_is_one_lookup_per_look(vmsdb_app_factory: Any, recorder: Recorder) -> None:
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        await app.service(Counter).bump("warm")
        await settle(app)
        recorder.sent.clear()
        waiters = [asyncio.create_task(app.outcome(f"tid-{i}", Tallied, timeout=10)) for i in range(5)]
        await asyncio.sleep(0.1)  # all five waiting: their first looks share one statement
        for i in range(5):
            with correlate(f"tid-{i}"):
                await app.service(Counter).bump(f"k{i}")
        assert [await w for w in waiters] == [Tallied(key=f"k{i}") for i in range(5)]
        looks = recorder.of("vmsdb-outcomes")
    # No transaction around a read: each look is one statement, and never one per waiter.
    assert all(s.statements == 1 and "BEGIN" not in s.sql for s in looks), [s.sql for s in looks]
    assert len(looks) <= 1 + (OUTCOME_WAIT - 1) * 5
    assert len(looks) >= 1


async def test_one_waiter_costs_at_most_two_lookups(vmsdb_app_factory: Any, recorder: Recorder) -> None:
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        await app.service(Counter).bump("warm")
        await settle(app)
        recorder.sent.clear()
        waiter = asyncio.create_task(app.outcome("tid-one", Tallied, timeout=10))
        await asyncio.sleep(0.1)
        with correlate("tid-one"):
            await app.service(Counter).bump("one")
        assert await waiter == Tallied(key="one")
        looks = recorder.of("vmsdb-outcomes")
    # The first look, then one for the notification naming Tallied: Bumped's costs none.
    assert len(looks) <= OUTCOME_WAIT, [s.sql for s in looks]


async def test_the_outbox_sent_with_commit_keeps_any_payload_intact(vmsdb_app_factory: Any) -> None:
    """The outbox's values are inlined in the COMMIT message: quotes, backslashes, semicolons,
    dollar quotes and non-ASCII text come out of the log as they went in."""
    key = "it's a \\ \"test\"; $$ -- \n\t é 🚀 E'x'"
    async with vmsdb_app_factory([Counter, Ledger], poll_interval=POLL) as app:
        waiter = asyncio.create_task(app.outcome("tid-quoted", Tallied, timeout=10))
        with correlate("tid-quoted"):
            assert await app.service(Counter).bump(key) == 1
        assert await waiter == Tallied(key=key)
