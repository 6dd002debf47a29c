"""G8: cross-service @Query reads see one snapshot; exports, functions, binding, typed rows."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel
from sqlalchemy import DateTime, text
from sqlalchemy.orm import Mapped, mapped_column

from framework import AnnotationError, App, Query, Service, Transactional, sql_function


class Customers(Service, name="customers"):
    @Transactional
    async def add(self, cid: str, balance: int = 0) -> None:
        from framework import session

        session().add(Customer(id=cid, name=f"name {cid}", balance=balance))


@Customers.export
class Customer(Customers.Model):
    __tablename__ = "customers"
    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]
    balance: Mapped[int]


@Customers.export
class CustDiscount(Customers.Model):
    __tablename__ = "cust_discounts"
    c_id: Mapped[str] = mapped_column(primary_key=True)
    disc_id: Mapped[int] = mapped_column(primary_key=True)
    percent: Mapped[int]
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    expired = sql_function("self.expires_at <= now()")


class Secret(Customers.Model):
    __tablename__ = "secrets"
    c_id: Mapped[str] = mapped_column(primary_key=True)
    card: Mapped[str]


@dataclass
class Discount:
    id: int


class DiscountRow(BaseModel):
    c_id: str
    disc_id: int
    percent: int


class Orders(Service, name="orders"):
    @Query(
        "FROM CustDiscount cd, Customer c JOIN c.id = cd.c_id "
        "WHERE c.id = :cust_id AND cd.disc_id IN (:discounts[id]) AND cd.expired() <> TRUE "
        "ORDER BY cd.disc_id"
    )
    async def find_discounts(self, discounts: list[Discount], cust_id: str) -> list[DiscountRow]: ...

    @Query("SELECT c.name FROM Customer c WHERE c.id = :cid")
    async def customer_name(self, cid: str) -> list[dict[str, object]]: ...

    @Query("SELECT coalesce(sum(balance), 0) AS total FROM Customer")
    async def customer_total(self) -> list[dict[str, int]]: ...

    @Query("SELECT coalesce(sum(amount), 0) AS total FROM Ledger")
    async def ledger_total(self) -> list[dict[str, int]]: ...

    @Transactional(type="RO", isolation="snapshot")
    async def both_totals(self) -> int:
        # Two queries, one transaction: both read the transaction's snapshot.
        customers = (await self.customer_total())[0]["total"]
        await asyncio.sleep(0)  # let the writer run between the two reads
        ledger = (await self.ledger_total())[0]["total"]
        return int(customers) + int(ledger)


class Ledger(Orders.Model):
    __tablename__ = "ledger"
    id: Mapped[str] = mapped_column(primary_key=True)
    amount: Mapped[int]


@pytest.fixture
def vmsdb_services():
    return [Customers, Orders]


async def execute(app: App, *statements: str) -> None:
    async with app.core.admin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_papers_query_with_exported_function_and_list_expansion(vmsdb_app: App) -> None:
    await vmsdb_app.service(Customers).add("c1")
    now = datetime.now(UTC)
    async with vmsdb_app.core.admin() as conn:
        for disc, offset in ((1, 1), (2, -1), (3, 1), (4, 1)):
            await conn.execute(
                text("INSERT INTO customers.cust_discounts VALUES ('c1', :d, :p, :e)"),
                {"d": disc, "p": disc * 5, "e": now + timedelta(days=offset)},
            )
    rows = await vmsdb_app.service(Orders).find_discounts([Discount(1), Discount(2), Discount(3)], "c1")
    # Discount 2 expired; 4 was not asked for.
    assert rows == [
        DiscountRow(c_id="c1", disc_id=1, percent=5),
        DiscountRow(c_id="c1", disc_id=3, percent=15),
    ]
    assert await vmsdb_app.service(Orders).find_discounts([], "c1") == []


async def test_injection_through_a_parameter_is_harmless(vmsdb_app: App) -> None:
    await vmsdb_app.service(Customers).add("c1")
    hostile = "c1' OR '1'='1'; DROP TABLE customers.customers; --"
    assert await vmsdb_app.service(Orders).customer_name(hostile) == []
    assert await vmsdb_app.service(Orders).customer_name("c1") == [{"name": "name c1"}]


async def test_query_naming_an_unexported_table_fails_at_start_up(vmsdb_database: str) -> None:
    class Snoop(Service, name="snoop"):
        @Query("SELECT s.card FROM Secret s")
        async def cards(self) -> list[dict[str, str]]: ...

    unexported = r"Snoop.cards.*'Secret' of service 'customers' is not exported"
    with pytest.raises(AnnotationError, match=unexported):
        App([Customers, Snoop], database_url=vmsdb_database)


async def test_no_fractured_reads_across_services(vmsdb_app: App) -> None:
    """A writer moves amounts between two services' tables atomically; readers never see a half."""
    await vmsdb_app.service(Customers).add("c1", balance=1000)
    await execute(vmsdb_app, "INSERT INTO orders.ledger VALUES ('l1', 0)")
    stop = asyncio.Event()
    moves = 0

    async def writer() -> None:
        nonlocal moves
        while not stop.is_set():
            # One transaction touching both services (as the core's own lease functions do).
            await execute(
                vmsdb_app,
                "UPDATE customers.customers SET balance = balance - 1 WHERE id = 'c1'",
                "UPDATE orders.ledger SET amount = amount + 1 WHERE id = 'l1'",
            )
            moves += 1

    task = asyncio.create_task(writer())
    orders = vmsdb_app.service(Orders)
    totals = set()
    try:
        for _ in range(1500):
            totals.add(await orders.both_totals())
    finally:
        stop.set()
        await task
    assert moves > 50  # the writer really interleaved with the readers
    assert totals == {1000}
