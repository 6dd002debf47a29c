"""G9: (URI, t, k) references, dependency counters and tombstones, on the real core."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Mapped, mapped_column

from dbcore.integrity import Reference
from framework import App, Service, Transactional, TruncateRefused, connection, session
from framework.references import (
    EntityDeleted,
    EntityNotFound,
    Ref,
    check,
    delete_reference,
    get_reference,
    install,
    ref_column,
    referenceable,
    refresh_reference,
    uri_of,
)


class Crm(Service, name="crm"):
    @Transactional
    async def put(self, cid: str, name: str, tier: int = 1) -> None:
        row = await session().get(Client, cid)
        if row is None:
            session().add(Client(id=cid, name=name, tier=tier))
        else:
            row.name, row.tier = name, tier

    @Transactional
    async def remove(self, cid: str) -> None:
        row = await session().get(Client, cid)
        assert row is not None
        await session().delete(row)

    @Transactional
    async def wipe(self) -> None:
        await connection().execute(text("TRUNCATE crm.clients"))


@referenceable
class Client(Crm.Model):
    __tablename__ = "clients"
    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]
    tier: Mapped[int]


class Shop(Service, name="shop"):
    @Transactional
    async def order(self, oid: str, cid: str, *, fail: bool = False) -> Ref:
        ref = await get_reference(Client, cid, copy=["name"])
        session().add(Purchase(id=oid, client=ref))
        if fail:
            raise RuntimeError("the order failed after taking the reference")
        return ref

    @Transactional
    async def cancel(self, oid: str) -> bool:
        row = await session().get(Purchase, oid)
        assert row is not None and row.client is not None
        await session().delete(row)
        return await delete_reference(row.client)

    @Transactional
    async def refresh(self, oid: str) -> Ref:
        row = await session().get(Purchase, oid)
        assert row is not None and row.client is not None
        row.client = await refresh_reference(row.client)
        return row.client

    @Transactional
    async def stored(self, oid: str) -> Ref | None:
        row = await session().get(Purchase, oid)
        return None if row is None else row.client


class Purchase(Shop.Model):
    __tablename__ = "purchases"
    id: Mapped[str] = mapped_column(primary_key=True)
    client: Mapped[Ref | None] = ref_column(Client)


class Rogue(Service, name="rogue"):
    @Transactional
    async def release_for_someone_else(self, uri: str) -> bool:
        return await delete_reference(uri)


@pytest.fixture
async def app(vmsdb_app_factory):  # type: ignore[no-untyped-def]
    async with vmsdb_app_factory([Crm, Shop, Rogue]) as started:
        await install(started)
        yield started


async def meta(app: App, uri: str) -> dict[str, object] | None:
    async with app.core.admin() as conn:
        row = (
            (
                await conn.execute(
                    text("SELECT t, k, d, deleted, value FROM vms.entities WHERE uri = :u"), {"u": uri}
                )
            )
            .mappings()
            .first()
        )
    return None if row is None else dict(row)


async def test_the_catalog_knows_references_from_the_registered_descriptors(app: App) -> None:
    """The core learns what a service gives and holds from its descriptor (vms.services), and
    installs exactly that: the referenceable table by its key, the reference column by its target."""
    async with app.core.admin() as conn:
        stored = dict((await conn.execute(text("SELECT name, descriptor FROM vms.services"))).all())
        referenceables = (
            await conn.execute(text("SELECT service, entity, key_columns FROM vms.referenceables"))
        ).all()
        columns = (
            await conn.execute(
                text(
                    "SELECT holder, holder_table, column_name, target_service, target_entity "
                    "FROM vms.reference_columns"
                )
            )
        ).all()
    crm, shop = (json.loads(d) if isinstance(d, str) else d for d in (stored["crm"], stored["shop"]))
    assert crm["referenceable"] == [{"table": "clients", "entity": "Client", "key": ["id"]}]
    assert shop["reference_columns"] == [
        {"table": "purchases", "column": "client", "target_service": "crm", "target_table": "clients"}
    ]
    assert [tuple(r) for r in referenceables] == [("crm", "clients", ["id"])]
    assert [tuple(r) for r in columns] == [("shop", "purchases", "client", "crm", "clients")]


async def test_a_reference_carries_uri_version_epoch_and_copy(app: App) -> None:
    await app.service(Crm).put("c1", "Ada")
    ref = await app.service(Shop).order("o1", "c1")
    assert ref.uri == "vms://crm/clients/c1" == uri_of(Client, "c1")
    assert (ref.t, ref.k) == (1, 1) and ref.copy == {"id": "c1", "name": "Ada"}
    assert await app.service(Shop).stored("o1") == ref
    assert (await meta(app, ref.uri) or {})["d"] == 1


async def test_every_change_moves_t_on_the_owners_own_clock(app: App) -> None:
    await app.service(Crm).put("c1", "Ada")
    await app.service(Crm).put("c2", "Bob")
    await app.service(Crm).put("c1", "Ada L.")
    assert (await meta(app, uri_of(Client, "c1")) or {})["t"] == 3
    assert (await meta(app, uri_of(Client, "c2")) or {})["t"] == 2
    ref = await app.service(Shop).order("o1", "c1")
    await app.service(Crm).put("c1", "Ada Lovelace")
    fresh = await app.service(Shop).refresh("o1")
    assert fresh.t == 4 > ref.t and fresh.copy == {"id": "c1", "name": "Ada Lovelace"}
    assert (await meta(app, ref.uri) or {})["d"] == 1  # a refresh takes no new reference


async def test_the_counter_moves_with_the_callers_transaction(app: App) -> None:
    await app.service(Crm).put("c1", "Ada")
    with pytest.raises(RuntimeError):
        await app.service(Shop).order("o1", "c1", fail=True)
    assert (await meta(app, uri_of(Client, "c1")) or {})["d"] == 0
    with pytest.raises(EntityNotFound):
        await app.service(Shop).order("o2", "nobody")


async def test_deleting_a_referenced_entity_leaves_a_tombstone_until_the_last_reference_goes(
    app: App,
) -> None:
    crm, shop = app.service(Crm), app.service(Shop)
    await crm.put("c1", "Ada", tier=3)
    await shop.order("o1", "c1")
    await shop.order("o2", "c1")
    await crm.remove("c1")
    uri = uri_of(Client, "c1")
    tomb = await meta(app, uri)
    assert tomb == {"t": 1, "k": 1, "d": 2, "deleted": True, "value": {"id": "c1", "name": "Ada", "tier": 3}}
    async with app.core.admin() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM crm.clients"))).scalar_one() == 0
    kept = await shop.refresh("o1")
    assert kept.deleted and kept.copy == {"id": "c1", "name": "Ada"} and kept.t == 1
    with pytest.raises(EntityDeleted):
        await shop.order("o3", "c1")
    assert (await check(app)).globally_consistent  # references to a tombstone are valid
    assert await shop.cancel("o1")
    assert (await meta(app, uri) or {})["d"] == 1
    assert await shop.cancel("o2")
    assert await meta(app, uri) is None  # the last reference took the tombstone with it


async def test_an_unreferenced_entity_is_deleted_at_once_and_can_come_back(app: App) -> None:
    await app.service(Crm).put("c1", "Ada")
    await app.service(Crm).remove("c1")
    assert await meta(app, uri_of(Client, "c1")) is None
    await app.service(Crm).put("c1", "Ada again")
    assert (await meta(app, uri_of(Client, "c1")) or {})["t"] == 2


async def test_a_service_cannot_give_back_a_reference_it_does_not_hold(app: App) -> None:
    await app.service(Crm).put("c1", "Ada")
    ref = await app.service(Shop).order("o1", "c1")
    assert not await app.service(Rogue).release_for_someone_else(ref.uri)
    assert (await meta(app, ref.uri) or {})["d"] == 1
    with pytest.raises(DBAPIError, match="permission denied"):  # nor touch the counters directly
        async with app.core.transaction("rogue") as conn:
            await conn.execute(text("UPDATE vms.entities SET d = 0"))


async def test_concurrent_references_and_a_delete_never_leave_a_dangling_reference(app: App) -> None:
    crm, shop = app.service(Crm), app.service(Shop)
    for i in range(5):
        await crm.put(f"c{i}", f"client {i}")

    async def order(n: int) -> None:
        with contextlib.suppress(EntityDeleted, EntityNotFound):  # after the delete: refused
            await shop.order(f"o{n}", f"c{n % 5}")

    async def remove(i: int) -> None:
        await asyncio.sleep(0.001 * i)
        await crm.remove(f"c{i}")

    await asyncio.gather(*(order(n) for n in range(60)), *(remove(i) for i in range(5)))
    report = await check(app)
    assert report.globally_consistent, report.to_json()
    async with app.core.admin() as conn:
        held = (await conn.execute(select(Purchase.__table__.c.client))).scalars().all()
        tombstones = (
            await conn.execute(text("SELECT uri, d FROM vms.entities WHERE deleted ORDER BY uri"))
        ).all()
    counts: dict[str, int] = {}
    for ref in held:
        counts[ref.uri] = counts.get(ref.uri, 0) + 1
    # Every client was deleted: exactly the referenced ones are tombstones, counting their references.
    assert dict(tombstones) == counts


async def test_definition_1_lists_each_broken_reference_with_both_ends(app: App) -> None:
    await app.service(Crm).put("c1", "Ada")
    await app.service(Crm).put("c2", "Bob")
    await app.service(Shop).order("o1", "c1")
    forged = {
        "o2": {"uri": "vms://crm/clients/c2", "t": 9, "k": 1},  # a version c2 never had
        "o3": {"uri": "vms://crm/clients/zz", "t": 1, "k": 1},  # an entity that never was
    }
    async with app.core.admin() as conn:  # what a lost update or a bug would leave behind
        for oid, ref in forged.items():
            await conn.execute(
                text("INSERT INTO shop.purchases VALUES (:o, CAST(:r AS jsonb))"),
                {"o": oid, "r": json.dumps(ref)},
            )
    report = await check(app)
    assert not report.globally_consistent and not report.weakly_consistent
    broken = {(v.kind, v.reference.key, v.reference.uri) for v in report.violations}
    assert broken == {("newer", "o2", "vms://crm/clients/c2"), ("missing", "o3", "vms://crm/clients/zz")}
    newer = next(v for v in report.violations if v.kind == "newer")
    assert newer.reference == Reference("shop", "purchases", "o2", "client", "vms://crm/clients/c2", 9, 1)
    assert newer.entity is not None and newer.entity.t == 2 and newer.covered_by is None
    # The forged rows were not counted: local consistency says so too.
    assert {p.problem for p in report.local} == {"shop holds 1 reference(s), counted 0"}


async def test_truncating_a_referenceable_table_is_refused(app: App) -> None:
    """TRUNCATE fires no row trigger: it would forget which entities are referenced."""
    await app.service(Crm).put("c1", "Ada")
    await app.service(Shop).order("o1", "c1")
    with pytest.raises(TruncateRefused, match=r"TRUNCATE of crm\.clients is refused.*DELETE its rows"):
        await app.service(Crm).wipe()
    entity = await meta(app, uri_of(Client, "c1"))
    assert entity is not None and entity["d"] == 1
    async with app.core.admin() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM crm.clients"))).scalar_one() == 1
