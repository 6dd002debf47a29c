"""Declared replicas: strong ones equal their source at every commit, eventual ones converge
and never move back to an older version."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Mapped, mapped_column

from dbcore import replicas
from framework import AnnotationError, App, Service, Transactional, session


class Catalog(Service, name="catalog"):
    @Transactional
    async def put(self, sku: str, price: int, version: int) -> None:
        row = await session().get(Item, sku)
        if row is None:
            session().add(Item(sku=sku, price=price, version=version))
        else:
            row.price, row.version = price, version

    @Transactional
    async def remove(self, sku: str) -> None:
        row = await session().get(Item, sku)
        if row is not None:
            await session().delete(row)


@Catalog.export
class Item(Catalog.Model):
    __tablename__ = "items"
    sku: Mapped[str] = mapped_column(primary_key=True)
    price: Mapped[int]
    version: Mapped[int]
    note: Mapped[str | None]


class Basket(Service, name="basket"):
    @Transactional(type="RO")
    async def strong_prices(self) -> dict[str, int]:
        rows = await session().execute(select(StrongItem.sku, StrongItem.price))
        return {r.sku: r.price for r in rows}


StrongItem = Basket.replica(Item, consistency="strong", table="strong_items", columns=["sku", "price"])
EventualItem = Basket.replica(Item, consistency="eventual", version="version")


@pytest.fixture
def vmsdb_services():
    return [Catalog, Basket]


async def diffs(app: App) -> dict[str, replicas.ReplicaDiff]:
    async with app.core.admin() as conn:
        return {d.table: d for d in await replicas.check(conn)}


async def test_replica_tables_live_in_the_holders_schema(vmsdb_app: App) -> None:
    assert StrongItem.__table__.schema == "basket"
    assert [c.name for c in StrongItem.__table__.columns] == ["sku", "price"]
    assert EventualItem.__table__.name == "replica_items"
    assert set(await diffs(vmsdb_app)) == {"strong_items", "replica_items"}


async def test_strong_replica_equals_its_source_after_every_commit(vmsdb_app: App) -> None:
    catalog, basket = vmsdb_app.service(Catalog), vmsdb_app.service(Basket)
    expected: dict[str, int] = {}
    for i in range(40):
        sku = f"s{i % 7}"
        if i % 5 == 4:
            await catalog.remove(sku)
            expected.pop(sku, None)
        else:
            await catalog.put(sku, price=i, version=i)
            expected[sku] = i
        # No drain, no wait: the replica changed in the source's own transaction.
        assert await basket.strong_prices() == expected
    assert (await diffs(vmsdb_app))["strong_items"].ok


async def test_eventual_replica_converges(vmsdb_app: App) -> None:
    catalog = vmsdb_app.service(Catalog)
    for i in range(30):
        await catalog.put(f"e{i % 6}", price=100 + i, version=i)
    await catalog.remove("e0")
    await vmsdb_app.drain()
    diff = (await diffs(vmsdb_app))["replica_items"]
    assert diff.ok and diff.pending == 0
    assert vmsdb_app.metrics.value("replica_changes", service="basket") == 31


async def test_eventual_replica_never_goes_backwards_under_reordered_changes(vmsdb_app: App) -> None:
    await vmsdb_app.service(Catalog).put("r", price=30, version=3)
    await vmsdb_app.drain()

    async def change(op: str, version: int, price: int) -> None:
        row = {"sku": "r", "price": price, "version": version, "note": None}
        async with vmsdb_app.core.admin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO vms.events (id, type, key, payload, producer) "
                    "VALUES (:id, 'vms.change.catalog.items', 'r', CAST(:p AS jsonb), 'catalog')"
                ),
                {"id": uuid.uuid4(), "p": json.dumps({"op": op, "row": row})},
            )

    # Stale changes arriving late (as a reordering transport could deliver them).
    await change("upsert", 1, 10)
    await change("upsert", 2, 20)
    await change("delete", 2, 20)  # a delete of an older version must not remove the newer row
    await vmsdb_app.drain()
    async with vmsdb_app.core.admin() as conn:
        row = (await conn.execute(text("SELECT price, version FROM basket.replica_items"))).one()
    assert tuple(row) == (30, 3)
    await change("upsert", 4, 40)
    await vmsdb_app.drain()
    async with vmsdb_app.core.admin() as conn:
        row = (await conn.execute(text("SELECT price, version FROM basket.replica_items"))).one()
    assert tuple(row) == (40, 4)


async def test_replica_of_an_unexported_model_is_a_start_up_error(vmsdb_database: str) -> None:
    class Vault(Service, name="vault"):
        pass

    class Gem(Vault.Model):
        __tablename__ = "gems"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Thief(Service, name="thief"):
        pass

    Thief.replica(Gem)
    with pytest.raises(AnnotationError, match="Gem is not exported by service 'vault'"):
        App([Vault, Thief], database_url=vmsdb_database)
