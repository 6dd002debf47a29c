"""``@Inbound(group_commit=N)``: queued deliveries of one handler run in one transaction.

What must hold (issue 14): each event's effect commits once, with its own acknowledgement;
events a grouped handler sends carry their own causation; a failure anywhere in a group rolls
the whole group back and every event runs again on its own, so one poison event costs the
others nothing but a second run. The kill -9 case is in ``test_crash_recovery.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import BigInteger, text
from sqlalchemy.orm import Mapped, mapped_column

from framework import AnnotationError, Event, Inbound, Outbound, Service, Transactional, send, session
from framework._internal.context import current

EVENTS = 40


class Item(Event, key="key"):
    key: str


class Noted(Event, key="key"):
    key: str


class Source(Service, name="source"):
    @Outbound(Item)
    @Transactional
    async def emit(self, keys: list[str]) -> None:
        """Every event in one transaction: the whole backlog becomes claimable at once."""
        for key in keys:
            send(Item(key=key))


#: Handler runs by key, rolled back ones included.
RUNS: dict[str, int] = {}


class Sink(Service, name="sink"):
    @Inbound(Item, max_attempts=2, group_commit=8)
    @Outbound(Noted)
    @Transactional
    async def on_item(self, event: Item) -> None:
        RUNS[event.key] = RUNS.get(event.key, 0) + 1
        ctx = current()
        assert ctx is not None
        session().add(Row(key=event.key, event_id=str(ctx.causation_id)))
        if event.key == "poison":
            raise ValueError("this event never goes through")
        send(Noted(key=event.key))


class Row(Sink.Model):
    __tablename__ = "rows"
    key: Mapped[str] = mapped_column(primary_key=True)
    event_id: Mapped[str]
    #: The handling transaction: events of one group share it.
    xid: Mapped[int] = mapped_column(BigInteger, server_default=text("txid_current()"))


async def _all(app: Any, sql: str) -> list[Any]:
    async with app.core.admin() as conn:
        return list((await conn.execute(text(sql))).all())


@pytest.fixture(autouse=True)
def _fresh_runs() -> None:
    RUNS.clear()


async def test_a_backlog_is_handled_in_groups_each_event_once(vmsdb_app_factory: Any) -> None:
    keys = [f"k{i}" for i in range(EVENTS)]
    async with vmsdb_app_factory([Source, Sink], poll_interval=0.05) as app:
        await app.service(Source).emit(keys)
        await app.drain()
        rows = await _all(app, "SELECT key, event_id, xid FROM sink.rows")
        # Each Noted was sent by the handling of the Item of its key (its causation).
        caused = await _all(
            app,
            "SELECT n.key, n.causation_id::text, i.id::text FROM vms.events n "
            "JOIN vms.events i ON i.type = 'Item' AND i.key = n.key WHERE n.type = 'Noted'",
        )
        pending = await _all(app, "SELECT count(*) FROM vms.deliveries WHERE subscriber = 'sink'")
    assert sorted(r.key for r in rows) == sorted(keys)
    assert len({r.xid for r in rows}) < EVENTS / 2, "the backlog was not handled in groups"
    assert {r.key: r.event_id for r in rows} == {key: item for key, _, item in caused}
    assert all(causation == item for _, causation, item in caused) and len(caused) == EVENTS
    assert pending == [(0,)]
    assert app.metrics.value("group_commit_splits") == 0


async def test_a_failing_event_rolls_back_its_group_and_only_it_fails(vmsdb_app_factory: Any) -> None:
    keys = [f"k{i}" for i in range(15)] + ["poison"]
    async with vmsdb_app_factory([Source, Sink], poll_interval=0.05) as app:
        await app.service(Source).emit(keys)
        await app.drain()
        rows = await _all(app, "SELECT key FROM sink.rows")
        noted = await _all(app, "SELECT key FROM vms.events WHERE type = 'Noted'")
        dead = await _all(app, "SELECT event_type, error FROM vms.dead_letters")
    assert sorted(r.key for r in rows) == sorted(keys[:-1])  # each once: key is the primary key
    assert sorted(r.key for r in noted) == sorted(keys[:-1])
    assert len(dead) == 1 and "never goes through" in dead[0].error
    assert app.metrics.value("group_commit_splits", service="sink") >= 1
    # The poison ran in its group, then alone twice (max_attempts=2); the others of its group
    # at most twice (the group, then alone), every other event once.
    assert RUNS["poison"] == 3
    assert all(1 <= RUNS[k] <= 2 for k in keys[:-1])


def test_group_commit_must_be_a_whole_number_of_at_least_one() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(AnnotationError, match="group_commit"):

            class Bad(Service, name="bad"):
                @Inbound(Item, group_commit=bad)  # type: ignore[arg-type]
                @Transactional
                async def on_item(self, event: Item) -> None: ...
