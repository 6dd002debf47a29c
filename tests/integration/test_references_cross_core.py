"""G9/G10 across cores: two databases, the reference and recovery protocols carried as events.

Each service lives on its own core (its own database). ``carry`` moves the protocol events that
started in one core's log into the other's, as the Kafka relay and ingress do: each is appended
with its origin (so it never travels back) and handled in the same transaction.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column

from dbcore import reference_events
from dbcore.eventlog import EventRecord, append
from framework import App, Service, Transactional, session
from framework.references import (
    Ref,
    backup,
    check,
    crash,
    install,
    ref_column,
    referenceable,
    release_remote,
    request_reference,
    restore,
    uri_of,
)
from framework.testing import fresh_database


class Guild(Service, name="guild"):
    @Transactional
    async def put(self, mid: str, name: str) -> None:
        row = await session().get(Fellow, mid)
        if row is None:
            session().add(Fellow(id=mid, name=name))
        else:
            row.name = name


@referenceable
class Fellow(Guild.Model):
    __tablename__ = "fellows"
    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]


class Archive(Service, name="archive"):
    @Transactional
    async def file(self, rid: str, fellow: str) -> str:
        session().add(Record(id=rid))
        return await request_reference(Record, {"id": rid}, "fellow", Fellow, fellow, copy=True)

    @Transactional
    async def refresh(self, rid: str) -> str:
        return await request_reference(
            Record, {"id": rid}, "fellow", uri_of(Fellow, "f1"), copy=True, refresh=True
        )

    @Transactional
    async def unfile(self, rid: str) -> None:
        row = await session().get(Record, rid)
        assert row is not None and row.fellow is not None
        await release_remote(row.fellow)
        await session().delete(row)

    @Transactional(type="RO")
    async def fellow_of(self, rid: str) -> Ref | None:
        row = await session().get(Record, rid)
        return None if row is None else row.fellow


class Record(Archive.Model):
    __tablename__ = "records"
    id: Mapped[str] = mapped_column(primary_key=True)
    fellow: Mapped[Ref | None] = ref_column(Fellow)


PROTOCOL = (
    "SELECT position, id, type, key, payload::text AS payload, producer FROM vms.events "
    "WHERE position > :p AND origin IS NULL AND (type LIKE 'vms.ref.%' OR type LIKE 'vms.recovery.%') "
    "ORDER BY position"
)


class Link:
    """Carries protocol events between two cores, both ways, until nothing is left to carry."""

    def __init__(self, a: App, b: App) -> None:
        self.cores = {"a": a, "b": b}
        self.cursor = {"a": 0, "b": 0}
        self.carried: list[str] = []

    async def carry(self, src: str, dst: str) -> int:
        async with self.cores[src].core.admin() as conn:
            rows = (await conn.execute(text(PROTOCOL), {"p": self.cursor[src]})).all()
        for r in rows:
            async with self.cores[dst].core.admin() as conn:
                record = EventRecord(r.id, r.type, r.key, r.payload, r.producer, origin=f"core:{src}")
                await append(conn, [record], deduplicate=True)
                await reference_events.handle_event(conn, r.type, json.loads(r.payload))
            self.cursor[src] = r.position
            self.carried.append(r.type)
        return len(rows)

    async def settle(self) -> None:
        while await self.carry("a", "b") + await self.carry("b", "a"):
            pass


@pytest.fixture
async def cores(vmsdb_server: str, tmp_path: Path) -> AsyncIterator[tuple[App, App]]:
    async with fresh_database(vmsdb_server) as url_a, fresh_database(vmsdb_server) as url_b:
        a = App([Guild], database_url=url_a, create_tables=True, data_dir=tmp_path)
        b = App([Archive], database_url=url_b, create_tables=True, data_dir=tmp_path)
        async with a, b:
            await install(a)
            await install(b)
            yield a, b


async def held(app: App, uri: str) -> tuple[int, dict[str, int]]:
    async with app.core.admin() as conn:
        d = (await conn.execute(text("SELECT d FROM vms.entities WHERE uri = :u"), {"u": uri})).scalar_one()
        holders = dict(
            (
                await conn.execute(
                    text("SELECT holder, count FROM vms.entity_holders WHERE uri = :u"), {"u": uri}
                )
            ).all()
        )
    return d, holders


async def test_a_reference_across_cores_is_granted_refreshed_and_released_by_events(
    cores: tuple[App, App],
) -> None:
    a, b = cores
    link = Link(a, b)
    await a.service(Guild).put("f1", "Ada")
    await b.service(Archive).file("r1", "f1")
    assert await b.service(Archive).fellow_of("r1") is None  # requested, not granted yet
    await link.settle()
    ref = await b.service(Archive).fellow_of("r1")
    assert ref is not None and (ref.uri, ref.t, ref.k, ref.copy) == (
        uri_of(Fellow, "f1"),
        1,
        1,
        {"id": "f1", "name": "Ada"},
    )
    assert await held(a, ref.uri) == (1, {"archive": 1})
    assert link.carried == ["vms.ref.acquire", "vms.ref.granted"]

    await a.service(Guild).put("f1", "Ada Lovelace")
    await b.service(Archive).refresh("r1")
    await link.settle()
    fresh = await b.service(Archive).fellow_of("r1")
    assert fresh is not None and fresh.t == 2 and fresh.copy == {"id": "f1", "name": "Ada Lovelace"}
    assert await held(a, ref.uri) == (1, {"archive": 1})  # a refresh counts nothing

    await b.service(Archive).file("r2", "nobody")
    await link.settle()
    async with b.core.admin() as conn:
        refused = (
            await conn.execute(text("SELECT fellow FROM archive.records WHERE id = 'r2'"))
        ).scalar_one()
    assert refused["error"].startswith("no referenceable entity")

    await b.service(Archive).unfile("r1")
    await link.settle()
    assert await held(a, ref.uri) == (0, {})
    assert (await check(a)).globally_consistent and (await check(b)).globally_consistent


async def test_a_restore_waits_for_and_merges_the_answer_of_a_holder_in_another_core(
    cores: tuple[App, App],
) -> None:
    a, b = cores
    link = Link(a, b)
    guild, archive = a.service(Guild), b.service(Archive)
    await guild.put("f1", "Ada")
    await archive.file("r1", "f1")
    await link.settle()
    await backup(a, "guild")  # counts archive's reference: the restore will expect its answer
    await guild.put("f1", "Ada Lovelace")  # t=2, lost with the crash...
    await archive.refresh("r1")
    await link.settle()  # ...but archive's copy has it
    await crash(a, "guild")

    recovering = asyncio.create_task(restore(a, "guild", mode="consistency", timeout=10))
    while not recovering.done():  # the link carries the amnesia there and the answer back
        await link.settle()
        await asyncio.sleep(0.02)
    state = recovering.result()
    assert (state.status, state.answered, state.merged) == (
        "completed",
        ("archive",),
        (uri_of(Fellow, "f1"),),
    )
    assert "vms.recovery.amnesia" in link.carried and "vms.recovery.answer" in link.carried
    async with a.core.admin() as conn:
        name = (await conn.execute(text("SELECT name FROM guild.fellows WHERE id = 'f1'"))).scalar_one()
    assert name == "Ada Lovelace"
    assert (await check(a)).globally_consistent
