"""A transaction's connection: the driver connection under ``connection()``, what a cancelled
call leaves behind, and the outbox statement each login's connection prepares."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Event, Outbound, Service, ServiceLimits, Transactional, connection, send, session


class Noted(Event, key="key"):
    key: str
    text: str


class Notes(Service, name="notes"):
    @Outbound(Noted)
    @Transactional(type="RW")
    async def write(self, key: str, body: str, *, fail: bool = False) -> tuple[int, int]:
        """One row through the driver, one through the session, one event; the transaction id
        as each of them sees it."""
        driver = (await connection().get_raw_connection()).driver_connection
        assert driver is not None
        await driver.execute("INSERT INTO notes.notes (key, body) VALUES ($1, $2)", key, body)
        session().add(Note(key=f"{key}/orm", body=body))
        send(Noted(key=key, text=body))
        if fail:
            raise RuntimeError("boom after the writes")
        seen_by_driver = await driver.fetchval("SELECT txid_current()")
        seen_by_core = (await connection().execute(text("SELECT txid_current()"))).scalar_one()
        return seen_by_driver, seen_by_core

    @Outbound(Noted)
    @Transactional(type="RW")
    async def send_many(self, keys: list[str], body: str) -> None:
        for key in keys:
            send(Noted(key=key, text=body))

    @Transactional(type="RW")
    async def sleep(self, seconds: float) -> None:
        await connection().execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


class Scribe(Service, name="scribe", limits=ServiceLimits(connections=1)):
    @Outbound(Noted)
    @Transactional(type="RW")
    async def send_one(self, key: str) -> None:
        send(Noted(key=key, text="sent"))

    @Outbound(Noted)
    @Transactional(type="RW")
    async def deallocate_then_send(self, key: str) -> None:
        await connection().execute(text("DEALLOCATE vms_outbox"))  # as DEALLOCATE ALL would
        send(Noted(key=key, text="sent"))


class Note(Notes.Model):
    __tablename__ = "notes"
    key: Mapped[str] = mapped_column(primary_key=True)
    body: Mapped[str]


async def _logged(app: App, producer: str) -> list[tuple[str, str]]:
    async with app.core.admin() as conn:
        rows = (
            await conn.execute(
                text("SELECT key, payload->>'text' FROM vms.events WHERE producer = :p ORDER BY position"),
                {"p": producer},
            )
        ).all()
    return [(r[0], r[1]) for r in rows]


async def test_the_driver_connection_runs_in_the_functions_transaction(vmsdb_app_factory: Any) -> None:
    async with vmsdb_app_factory([Notes]) as app:
        notes = app.service(Notes)
        by_driver, by_core = await notes.write("k1", "kept")
        with pytest.raises(RuntimeError, match="boom"):
            await notes.write("k2", "lost", fail=True)
        async with app.core.admin() as conn:
            rows = (await conn.execute(text("SELECT key, body FROM notes.notes ORDER BY key"))).all()
        logged = await _logged(app, "notes")
    assert by_driver == by_core  # one transaction, whichever way a statement is sent
    assert [tuple(r) for r in rows] == [("k1", "kept"), ("k1/orm", "kept")]
    assert logged == [("k1", "kept")]  # the failed call's event rolled back with its rows


async def test_cancelled_calls_leave_no_connection_or_transaction_behind(vmsdb_app_factory: Any) -> None:
    async with vmsdb_app_factory([Notes], workers=False) as app:
        notes = app.service(Notes)
        await notes.sleep(0)
        pool = app.core.pools()["notes"]
        rng = random.Random(7)
        # More callers than the pool holds: some are cancelled waiting for a connection, some
        # in their statement, some while committing or giving the connection back.
        calls = [asyncio.create_task(notes.sleep(0)) for _ in range(3 * pool.size())]
        for call in calls:
            await asyncio.sleep(rng.uniform(0, 0.002))
            call.cancel()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert any(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert pool.checkedout() == 0
        assert pool.checkedin() <= pool.size()
        # Every connection the pool kept is out of any transaction, and usable.
        await asyncio.gather(*(notes.sleep(0.01) for _ in range(2 * pool.size())))
        async with app.core.admin() as conn:
            states = (
                await conn.execute(
                    text(
                        "SELECT state FROM pg_stat_activity WHERE usename = 'vms_notes' "
                        "AND datname = current_database()"
                    )
                )
            ).scalars().all()
    assert states and all(s == "idle" for s in states), states


async def test_the_outbox_of_several_events_is_logged_whole(vmsdb_app_factory: Any) -> None:
    body = "it's a \\ \"test\"; $$ -- \n é 🚀 E'x' ARRAY[NULL]"
    async with vmsdb_app_factory([Notes], workers=False) as app:
        for _ in range(8):  # past the server's first, custom, plans of the prepared statement
            await app.service(Notes).send_many(["a", "b", "c"], body)
        logged = await _logged(app, "notes")
    assert logged == [(k, body) for _ in range(8) for k in ("a", "b", "c")]


async def test_a_deallocated_outbox_statement_fails_one_transaction_only(vmsdb_app_factory: Any) -> None:
    async with vmsdb_app_factory([Scribe], workers=False) as app:
        scribe = app.service(Scribe)
        await scribe.send_one("before")
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            await scribe.deallocate_then_send("lost")
        # The same (only) connection: its outbox is inlined from now on.
        await scribe.send_one("after")
        assert app.core.pools()["scribe"].size() == 1
        logged = await _logged(app, "scribe")
    assert logged == [("before", "sent"), ("after", "sent")]
