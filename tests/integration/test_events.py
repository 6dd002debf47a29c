"""Events: outbox atomicity (G2), no gaps (G3), order and precedence (G5), failures (G6, G12)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Mapped, mapped_column

from framework import (
    App,
    Event,
    Inbound,
    Outbound,
    Service,
    Transactional,
    UndeclaredEventError,
    correlate,
    send,
    session,
)
from framework._internal.context import current


class Note(Event, key="key"):
    key: str
    seq: int
    fail: bool = False


class Flag(Event, key="key"):
    key: str
    seq: int


class Noted(Event, key="key"):
    key: str
    seq: int


class Stray(Event):
    text: str


# Test knobs the handlers read: which keys to slow down, how long.
SLOW: dict[str, float] = {}


class Writer(Service, name="writer"):
    @Outbound(Note)
    @Transactional(type="RW")
    async def write(self, key: str, seq: int, *, hold: float = 0.0, fail: bool = False) -> None:
        session().add(Written(key=key, seq=seq))
        send(Note(key=key, seq=seq))
        if hold:
            await session().flush()  # takes the transaction id now ...
            await asyncio.sleep(hold)  # ... and commits after later transactions
        if fail:
            raise RuntimeError("writer failed after sending")

    @Outbound(Flag)
    @Transactional(type="RW")
    async def flag(self, key: str, seq: int) -> None:
        send(Flag(key=key, seq=seq))

    @Outbound(Note)
    @Transactional(type="RW")
    async def stray(self) -> None:
        session().add(Written(key="stray", seq=0))
        send(Stray(text="not declared"))  # type: ignore[arg-type]


class Written(Writer.Model):
    __tablename__ = "written"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    key: Mapped[str]
    seq: Mapped[int]


class Reader(Service, name="reader"):
    @Inbound(Note, precedence=Flag, max_attempts=3)
    @Outbound(Noted)
    async def on_note(self, ev: Note) -> Noted:
        delay = SLOW.get(ev.key, 0.0)
        if delay:
            await asyncio.sleep(delay)
        if ev.fail:
            raise ValueError(f"note {ev.key}/{ev.seq} is poisonous")
        ctx = current()
        assert ctx is not None
        session().add(Seen(kind="note", key=ev.key, seq=ev.seq, correlation_id=ctx.correlation_id))
        return Noted(key=ev.key, seq=ev.seq)

    @Inbound(Flag)
    async def on_flag(self, ev: Flag) -> None:
        session().add(Seen(kind="flag", key=ev.key, seq=ev.seq))


class Seen(Reader.Model):
    __tablename__ = "seen"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    kind: Mapped[str]
    key: Mapped[str]
    seq: Mapped[int]
    correlation_id: Mapped[str | None]


@pytest.fixture
def vmsdb_services():
    return [Writer, Reader]


@pytest.fixture(autouse=True)
def _reset_knobs():
    SLOW.clear()
    yield
    SLOW.clear()


async def seen(app: App, kind: str = "note") -> list[tuple[str, int]]:
    async with app.core.admin() as conn:
        rows = await conn.execute(select(Seen.key, Seen.seq).where(Seen.kind == kind).order_by(Seen.id))
        return [(r.key, r.seq) for r in rows]


async def scalar(app: App, sql: str) -> object:
    async with app.core.admin() as conn:
        return (await conn.execute(text(sql))).scalar_one()


# -- G2: the outbox commits with the state, or not at all ------------------------------------


async def test_state_and_events_commit_together(vmsdb_app: App) -> None:
    await vmsdb_app.service(Writer).write("k", 1)
    await vmsdb_app.drain()
    assert await scalar(vmsdb_app, "SELECT count(*) FROM writer.written") == 1
    assert await scalar(vmsdb_app, "SELECT count(*) FROM vms.events WHERE type = 'Note'") == 1
    assert await seen(vmsdb_app) == [("k", 1)]


async def test_failed_transaction_publishes_nothing(vmsdb_app: App) -> None:
    with pytest.raises(RuntimeError, match="writer failed"):
        await vmsdb_app.service(Writer).write("k", 1, fail=True)
    await vmsdb_app.drain()
    assert await scalar(vmsdb_app, "SELECT count(*) FROM writer.written") == 0
    assert await scalar(vmsdb_app, "SELECT count(*) FROM vms.events") == 0
    assert await seen(vmsdb_app) == []


async def test_undeclared_event_raises_and_rolls_back(vmsdb_app: App) -> None:
    with pytest.raises(UndeclaredEventError, match=r"Stray.*declared: Note"):
        await vmsdb_app.service(Writer).stray()
    assert await scalar(vmsdb_app, "SELECT count(*) FROM writer.written") == 0
    assert await scalar(vmsdb_app, "SELECT count(*) FROM vms.events") == 0


async def test_events_carry_producer_correlation_and_causation(vmsdb_app: App) -> None:
    with correlate("tid-42"):
        await vmsdb_app.service(Writer).write("k", 1)
    await vmsdb_app.drain()
    async with vmsdb_app.core.admin() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT id, type, key, producer, correlation_id, causation_id "
                    "FROM vms.events ORDER BY position"
                )
            )
        ).all()
    note, noted = rows
    assert (note.type, note.key, note.producer, note.correlation_id) == ("Note", "k", "writer", "tid-42")
    assert note.causation_id is None
    # The handler's event inherits the correlation and names its cause.
    assert (noted.type, noted.producer, noted.correlation_id) == ("Noted", "reader", "tid-42")
    assert noted.causation_id == note.id
    assert await scalar(vmsdb_app, "SELECT correlation_id FROM reader.seen") == "tid-42"


async def test_a_service_cannot_forge_events_in_another_name(vmsdb_app: App) -> None:
    with pytest.raises(Exception, match="row-level security"):
        async with vmsdb_app.core.transaction("reader") as conn:
            await conn.execute(
                text(
                    "INSERT INTO vms.events (id, type, key, payload, producer) "
                    "VALUES (gen_random_uuid(), 'Note', 'k', '{}', 'writer')"
                )
            )


# -- G3: no gaps, whatever the commit order --------------------------------------------------


async def test_long_and_short_transactions_every_event_arrives_in_key_order(vmsdb_app: App) -> None:
    writer = vmsdb_app.service(Writer)
    # A long transaction takes the first position, then short ones commit before it does.
    long = asyncio.create_task(writer.write("shared", 0, hold=0.5))
    await asyncio.sleep(0.1)

    async def short_ones_in_order() -> None:
        for i in range(1, 6):
            await writer.write("shared", i)

    await asyncio.gather(long, short_ones_in_order(), *(writer.write(f"solo-{i}", i) for i in range(20)))
    await vmsdb_app.drain()
    got = await seen(vmsdb_app)
    assert sorted(got) == sorted([("shared", i) for i in range(6)] + [(f"solo-{i}", i) for i in range(20)])
    # The long transaction took its id first: its event is handled first for that key, even
    # though it committed last, and the reader skipped nothing while it was open.
    assert [s for k, s in got if k == "shared"] == [0, 1, 2, 3, 4, 5]


async def test_concurrent_producers_lose_nothing(vmsdb_app: App) -> None:
    writer = vmsdb_app.service(Writer)

    async def produce(worker: int) -> None:
        for i in range(25):
            await writer.write(f"p{worker}", i, hold=0.002 * (i % 3))

    await asyncio.gather(*(produce(w) for w in range(8)))
    await vmsdb_app.drain()
    got = await seen(vmsdb_app)
    assert len(got) == 200
    for w in range(8):
        assert [s for k, s in got if k == f"p{w}"] == list(range(25))


# -- G5: FIFO per key, parallel across keys, precedence ----------------------------------------


async def test_keys_run_in_parallel_and_each_key_in_order(vmsdb_app: App) -> None:
    SLOW["slow"] = 0.3
    writer = vmsdb_app.service(Writer)
    for i in range(3):
        await writer.write("slow", i)
    for i in range(10):
        await writer.write("fast", i)
    await vmsdb_app.drain()
    got = await seen(vmsdb_app)
    assert [s for k, s in got if k == "slow"] == [0, 1, 2]
    assert [s for k, s in got if k == "fast"] == list(range(10))
    # The fast key did not wait behind the slow one.
    assert got.index(("fast", 9)) < got.index(("slow", 2))


async def test_precedence_holds_a_flag_until_earlier_notes_are_handled(vmsdb_app: App) -> None:
    SLOW["a"] = 0.4  # the note handler is slow
    writer = vmsdb_app.service(Writer)
    await writer.write("a", 1)
    await writer.flag("b", 1)  # another key: without precedence it would overtake the note
    await writer.write("c", 1)  # a later note does not hold the flag back
    await vmsdb_app.drain()
    async with vmsdb_app.core.admin() as conn:
        order = [(r.kind, r.key) for r in await conn.execute(select(Seen.kind, Seen.key).order_by(Seen.id))]
    assert order.index(("note", "a")) < order.index(("flag", "b"))


# -- G6 and G12: retries, dead letters, poison payloads, replay ------------------------------


async def test_failing_handler_is_retried_then_dead_lettered_while_others_flow(vmsdb_app: App) -> None:
    writer = vmsdb_app.service(Writer)
    await vmsdb_app.publish(Note(key="bad", seq=1, fail=True))
    await writer.write("bad", 2)  # same key: flows once the poisonous one is dead-lettered
    await writer.write("good", 1)
    await vmsdb_app.drain(timeout=60)
    assert sorted(await seen(vmsdb_app)) == [("bad", 2), ("good", 1)]
    async with vmsdb_app.core.admin() as conn:
        letter = (await conn.execute(text("SELECT * FROM vms.dead_letters"))).one()
    assert (letter.subscriber, letter.event_type, letter.key, letter.attempts) == ("reader", "Note", "bad", 3)
    assert "ValueError: note bad/1 is poisonous" in letter.error
    assert "on_note" in letter.traceback
    assert vmsdb_app.metrics.value("event_retries", service="reader") == 2


async def test_poison_payload_goes_to_dead_letters_at_once(vmsdb_app: App) -> None:
    async with vmsdb_app.core.admin() as conn:
        await conn.execute(
            text(
                "INSERT INTO vms.events (id, type, key, payload) VALUES (:id, 'Note', 'k', CAST(:p AS jsonb))"
            ),
            {"id": uuid.uuid4(), "p": json.dumps({"key": "k", "seq": "not a number"})},
        )
    await vmsdb_app.service(Writer).write("k", 2)
    await vmsdb_app.drain()
    assert await seen(vmsdb_app) == [("k", 2)]
    async with vmsdb_app.core.admin() as conn:
        letter = (await conn.execute(text("SELECT * FROM vms.dead_letters"))).one()
    assert letter.attempts == 1
    assert "payload is not a valid Note" in letter.error and "seq" in letter.error
    assert json.loads(letter.payload) if isinstance(letter.payload, str) else letter.payload


async def test_replay_delivers_a_dead_letter_again(vmsdb_app: App) -> None:
    from dbcore import delivery

    await vmsdb_app.publish(Note(key="r", seq=1, fail=True))
    await vmsdb_app.drain(timeout=60)
    async with vmsdb_app.core.admin() as conn:
        letter_id = (await conn.execute(text("SELECT id FROM vms.dead_letters"))).scalar_one()
    # Fix the cause (here: the payload), then replay.
    async with vmsdb_app.core.admin() as conn:
        await conn.execute(text("UPDATE vms.events SET payload = payload || '{\"fail\": false}'::jsonb"))
        assert await delivery.replay(conn, letter_id) is True
    await vmsdb_app.drain()
    assert await seen(vmsdb_app) == [("r", 1)]
    async with vmsdb_app.core.admin() as conn:
        assert await delivery.replay(conn, letter_id) is False  # once only


# -- awaiting an outcome; retention -----------------------------------------------------------


async def test_outcome_returns_the_chain_result(vmsdb_app: App) -> None:
    waiter = asyncio.create_task(vmsdb_app.outcome("tid-7", Noted, timeout=10))
    await asyncio.sleep(0.05)
    with correlate("tid-7"):
        await vmsdb_app.service(Writer).write("o", 7)
    result = await waiter
    assert result == Noted(key="o", seq=7)
    # Asking after the fact finds it too.
    assert await vmsdb_app.outcome("tid-7", Noted, timeout=1) == Noted(key="o", seq=7)
    with pytest.raises(TimeoutError, match="no Noted in correlation 'nope'"):
        await vmsdb_app.outcome("nope", Noted, timeout=0.2)


async def test_retention_prunes_handled_events_only(vmsdb_app: App) -> None:
    from dbcore.eventlog import prune

    await vmsdb_app.service(Writer).write("x", 1)
    await vmsdb_app.drain()
    async with vmsdb_app.core.admin() as conn:
        await conn.execute(text("UPDATE vms.events SET created_at = now() - interval '2 days'"))
        # One event still pending for a subscriber must survive.
        await conn.execute(
            text(
                "INSERT INTO vms.deliveries (subscriber, position, xid, event_type, key) "
                "SELECT 'reader', position, xid, type, key FROM vms.events WHERE type = 'Note'"
            )
        )
        removed = await prune(conn, 24 * 3600)
        remaining = (await conn.execute(text("SELECT type FROM vms.events"))).scalars().all()
        await conn.execute(text("DELETE FROM vms.deliveries"))
    assert removed == 1 and remaining == ["Note"]


class Strict(Service, name="strict"):
    """Handles notes with blocking order: a dead letter holds its key until replayed."""

    @Inbound(Note, max_attempts=1, blocking=True)
    async def on_note(self, ev: Note) -> None:
        if ev.fail:
            raise ValueError("strict refuses")
        session().add(StrictSeen(key=ev.key, seq=ev.seq))


class StrictSeen(Strict.Model):
    __tablename__ = "seen"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    key: Mapped[str]
    seq: Mapped[int]


async def test_blocking_dead_letter_holds_its_key_until_replayed(vmsdb_app_factory) -> None:
    from dbcore import delivery

    async with vmsdb_app_factory([Strict]) as app:
        await app.publish(Note(key="k", seq=1, fail=True))
        await app.publish(Note(key="k", seq=2))
        await app.publish(Note(key="other", seq=1))
        await asyncio.sleep(0.5)
        async with app.core.admin() as conn:
            handled = (await conn.execute(text("SELECT key, seq FROM strict.seen"))).all()
            letter = (await conn.execute(text("SELECT id, blocking FROM vms.dead_letters"))).one()
        # The other key flowed; k waits behind its dead letter.
        assert [tuple(r) for r in handled] == [("other", 1)] and letter.blocking
        async with app.core.admin() as conn:
            await conn.execute(text("UPDATE vms.events SET payload = payload || '{\"fail\": false}'::jsonb"))
            assert await delivery.replay(conn, letter.id)
        await app.drain()
        async with app.core.admin() as conn:
            rows = (await conn.execute(text("SELECT key, seq FROM strict.seen ORDER BY id"))).all()
        assert [tuple(r) for r in rows] == [("other", 1), ("k", 1), ("k", 2)]


async def test_discarding_a_blocking_dead_letter_lets_its_key_flow(vmsdb_app_factory) -> None:
    from dbcore import delivery

    async with vmsdb_app_factory([Strict]) as app:
        await app.publish(Note(key="k", seq=1, fail=True))
        await app.publish(Note(key="k", seq=2))
        await asyncio.sleep(0.3)
        async with app.core.admin() as conn:
            letter_id = (await conn.execute(text("SELECT id FROM vms.dead_letters"))).scalar_one()
            assert await delivery.discard(conn, letter_id)
        await app.drain()
        async with app.core.admin() as conn:
            rows = (await conn.execute(text("SELECT key, seq FROM strict.seen"))).all()
        assert [tuple(r) for r in rows] == [("k", 2)]


async def test_stopping_gives_back_claims_no_worker_started_on(vmsdb_app_factory) -> None:
    """Claims taken ahead of the workers go back untried at stop; running handlers finish."""
    keys = 40
    async with vmsdb_app_factory([Writer, Reader], workers=False) as producer:
        for k in range(keys):
            await producer.service(Writer).write(f"k{k:02d}", 1)
    SLOW.update({f"k{k:02d}": 0.4 for k in range(keys)})
    async with vmsdb_app_factory([Writer, Reader]) as app:
        await asyncio.sleep(0.2)  # every key claimed (64 ahead), 16 handlers running
        claimed = await scalar(app, "SELECT count(*) FROM vms.deliveries WHERE claim IS NOT NULL")
        assert claimed == keys
    # Stopped: the handlers that had started finished; the rest are unclaimed, attempts untouched.
    async with vmsdb_app_factory([Writer, Reader], workers=False) as app:
        handled = len(await seen(app))
        assert 0 < handled < keys
        left = await scalar(
            app,
            "SELECT count(*) FROM vms.deliveries WHERE subscriber = 'reader' "
            "AND claim IS NULL AND attempts = 0",
        )
        assert left == keys - handled
    SLOW.clear()
    async with vmsdb_app_factory([Writer, Reader]) as app:
        await app.drain()
        assert sorted(await seen(app)) == [(f"k{k:02d}", 1) for k in range(keys)]


async def test_a_claim_that_waited_too_long_for_a_worker_is_left_to_run_out(
    vmsdb_app_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """One worker, slow handlers, a short claim timeout: claims queued behind the first handler
    grow too old to start on; they run out, are claimed again, and each note counts once."""
    caplog.set_level(logging.INFO, logger="vmsdb.delivery")
    async with vmsdb_app_factory([Writer, Reader], workers=False) as producer:
        for k in range(3):
            await producer.service(Writer).write(f"k{k}", 1)
    SLOW.update({f"k{k}": 0.7 for k in range(3)})
    async with vmsdb_app_factory([Writer, Reader], worker_concurrency=1, claim_timeout=1.0) as app:
        await app.drain(timeout=20)
        assert sorted(await seen(app)) == [("k0", 1), ("k1", 1), ("k2", 1)]
        reclaimed = await scalar(app, "SELECT count(*) FROM vms.dead_letters")
        assert reclaimed == 0
    assert "waited too long for a worker" in caplog.text


async def test_a_keys_events_follow_each_other_without_waiting_for_a_poll(vmsdb_app_factory) -> None:
    """When a key's head is handled, its next event is claimed at once: no notification comes
    for it (it committed long ago), so the dispatcher must know to look again."""

    class Tail(Service, name="tail"):  # no precedence: only a key's own head holds it back
        @Inbound(Note)
        async def on_note(self, ev: Note) -> None:
            session().add(Tailed(key=ev.key, seq=ev.seq))

    class Tailed(Tail.Model):
        __tablename__ = "tailed"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
        key: Mapped[str]
        seq: Mapped[int]

    async with vmsdb_app_factory([Writer, Tail], workers=False) as producer:
        for seq in range(30):
            await producer.service(Writer).write("solo", seq)
    async with vmsdb_app_factory([Writer, Tail], poll_interval=5.0) as app:
        await app.drain(timeout=4.0)  # 30 polls would take 150 s
        async with app.core.admin() as conn:
            rows = (await conn.execute(select(Tailed.seq).order_by(Tailed.id))).scalars().all()
        assert rows == list(range(30))


async def test_a_retry_runs_when_its_backoff_ends_not_at_the_next_poll(vmsdb_app_factory) -> None:
    async with vmsdb_app_factory([Writer, Reader], poll_interval=5.0) as app:
        await app.publish(Note(key="bad", seq=1, fail=True))
        await app.drain(timeout=4.0)  # two backoffs of at most 0.1 s, not two 5 s polls
        assert await scalar(app, "SELECT attempts FROM vms.dead_letters") == 3


async def test_events_behind_the_horizon_are_taken_soon_after_it_moves(vmsdb_app_factory) -> None:
    """An older transaction that sends no events ends without a notification: the dispatcher
    polls while events wait behind it, not only every poll_interval."""
    async with vmsdb_app_factory([Writer, Reader], poll_interval=5.0) as app:
        async with app.core.admin() as horizon:
            await horizon.execute(text("SELECT pg_current_xact_id()"))  # takes an xid first
            for seq in range(3):
                await app.service(Writer).write("late", seq)
            await asyncio.sleep(0.3)
            assert await seen(app) == []  # all held back by the open transaction
        await app.drain(timeout=2.0)
        assert await seen(app) == [("late", 0), ("late", 1), ("late", 2)]


async def test_a_backlog_of_one_service_does_not_queue_anothers_events_behind_it(vmsdb_app_factory) -> None:
    """Workers serve the services in turn: an event for another service is taken by the next
    free worker, not after every claimed event of a slow backlog."""
    started: list[tuple[str, int]] = []
    busy, flagged = asyncio.Event(), asyncio.Event()

    class Slow(Service, name="slow"):
        @Inbound(Noted)
        async def on_noted(self, ev: Noted) -> None:
            await asyncio.sleep(0.05)
            started.append(("slow", ev.seq))
            if len(started) >= 20:
                busy.set()

    class Quick(Service, name="quick"):
        @Inbound(Flag)
        async def on_flag(self, ev: Flag) -> None:
            started.append(("quick", ev.seq))
            flagged.set()

    async with vmsdb_app_factory([Writer, Slow, Quick], workers=False) as producer:
        for seq in range(300):
            await producer.publish(Noted(key=f"k{seq}", seq=seq))
    async with vmsdb_app_factory([Writer, Slow, Quick]) as app:
        await asyncio.wait_for(busy.wait(), 20)  # the backlog is being worked on, 64 claimed ahead
        await app.service(Writer).flag("f", 1)
        before = len(started)  # the flag is committed: from here on, what runs ahead of it overtook it
        await asyncio.wait_for(flagged.wait(), 20)
        overtaken = started.index(("quick", 1)) - before
        # Served in turn, the flag waits for the handlers already running (16) at most, not for
        # the ~48 events of the backlog queued ahead of it.
        assert overtaken <= 20, overtaken
