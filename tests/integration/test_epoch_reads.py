"""Reads begin epochs (recovery paper §3.3, Definition 2) through the framework.

A service restored from an old backup serves in availability mode while its holders' answers
are still on their way. The first read of an entity in that window (the owner's function, or
another service's ``@Query``) begins the entity's new epoch on the value read: the late answer
must not overwrite it, and the recovery reports the holder's copy as a conflict instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column

from dbcore import backup as backups
from dbcore.recovery import state as recovery_state
from framework import App, Query, Service, Transactional, session
from framework.references import (
    Ref,
    ServiceRecovering,
    answer,
    backup,
    check,
    crash,
    get_reference,
    install,
    ref_column,
    referenceable,
    restore,
)


class Roster(Service, name="roster"):
    @Transactional(type="RO")
    async def name_of(self, pid: str) -> str | None:
        row = await session().get(Player, pid)
        return None if row is None else row.name

    @Transactional
    async def put(self, pid: str, name: str) -> None:
        row = await session().get(Player, pid)
        if row is None:
            session().add(Player(id=pid, name=name))
        else:
            row.name = name


@Roster.export
@referenceable
class Player(Roster.Model):
    __tablename__ = "players"
    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]


class League(Service, name="league"):  # keeps cached copies of players
    @Transactional
    async def enter(self, eid: str, pid: str) -> Ref:
        ref = await get_reference(Player, pid, copy=True)
        session().add(Entry(id=eid, player=ref))
        return ref

    @Query("SELECT p.name FROM Player p WHERE p.id = :pid")
    async def player_name(self, pid: str) -> list[dict[str, object]]: ...


class Entry(League.Model):
    __tablename__ = "entries"
    id: Mapped[str] = mapped_column(primary_key=True)
    player: Mapped[Ref | None] = ref_column(Player)


@pytest.fixture
async def app(vmsdb_app_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    async with vmsdb_app_factory([Roster, League], data_dir=tmp_path) as started:
        await install(started)
        yield started


async def names(app: App) -> dict[str, str]:
    async with app.core.admin() as conn:
        return dict((await conn.execute(text("SELECT id, name FROM roster.players"))).all())


async def disaster(app: App) -> None:
    """p1 renamed after the backup; league caches the lost name; roster crashes."""
    roster = app.service(Roster)
    await roster.put("p1", "Ann")
    await roster.put("p2", "Ben")
    await backup(app, "roster")
    await roster.put("p1", "Anna")  # lost with the crash; league keeps a copy
    await app.service(League).enter("e1", "p1")
    await app.service(League).enter("e2", "p2")  # p2 at its backup version: nothing to merge
    await crash(app, "roster")


async def until(condition: Callable[[], bool], what: str) -> None:
    """The App learns of restores and their ends from notifications: wait until it has."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the App never heard that {what}")


async def restored_late(app: App) -> str:
    """The disaster, and a restore whose holder has not answered yet; the recovery's id."""
    await disaster(app)
    state = await restore(app, "roster", answers=False)
    await until(lambda: "roster" in app.host.amnesia, "roster was restored")
    return state.id


async def test_without_a_read_the_late_answer_brings_the_lost_value_back(app: App) -> None:
    await disaster(app)
    state = await restore(app, "roster", answers=False)
    await answer(app, state.id, "league")
    assert (await names(app))["p1"] == "Anna"


async def test_an_owner_read_in_amnesia_is_never_overwritten_by_a_late_merge(app: App) -> None:
    recovery_id = await restored_late(app)
    assert await app.service(Roster).name_of("p1") == "Ann"  # read in the new epoch
    await answer(app, recovery_id, "league")
    assert (await names(app))["p1"] == "Ann"  # what was read stays
    async with app.core.admin() as conn:
        after = await recovery_state(conn, recovery_id)
    assert [(c.uri, c.holder, c.copy["name"]) for c in after.conflicts] == [
        ("vms://roster/players/p1", "league", "Anna")
    ]
    report = await check(app)
    assert report.weakly_consistent and not report.globally_consistent
    assert [v.reference.uri for v in report.violations] == ["vms://roster/players/p1"]


async def test_an_unread_entity_still_merges_when_another_was_read(app: App) -> None:
    recovery_id = await restored_late(app)
    assert await app.service(Roster).name_of("p2") == "Ben"  # p2 read, p1 not
    await answer(app, recovery_id, "league")
    assert (await names(app))["p1"] == "Anna"


async def test_another_services_query_in_amnesia_begins_the_epoch_too(app: App) -> None:
    recovery_id = await restored_late(app)
    assert await app.service(League).player_name("p1") == [{"name": "Ann"}]
    await answer(app, recovery_id, "league")
    assert (await names(app))["p1"] == "Ann"


async def test_in_consistency_mode_other_services_queries_of_the_owner_are_refused(app: App) -> None:
    await disaster(app)
    state = await backups.restore(app.core.engine, "roster", mode="consistency")
    await app.core.sync_grants(app.descriptors)
    await until(lambda: "roster" in app.recovering, "roster recovers")
    with pytest.raises(ServiceRecovering, match=r"league.*roster"):
        await app.service(League).player_name("p1")
    await answer(app, state.id, "league")  # the last answer: roster serves again
    await until(lambda: "roster" not in app.recovering, "roster serves again")
    assert await app.service(League).player_name("p1") == [{"name": "Anna"}]
