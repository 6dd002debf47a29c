"""Small services shared by the integration tests."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.orm import Mapped, mapped_column

from framework import Event, Inbound, Outbound, Service, Transactional, session


class Deposit(Event, key="account"):
    account: str
    amount: int


class Deposited(Event, key="account"):
    account: str
    balance: int


class Bank(Service, name="bank"):
    @Transactional(type="RW", isolation="serializable")
    async def open(self, account: str, balance: int = 0) -> None:
        session().add(Account(id=account, balance=balance))

    @Transactional(type="RW", isolation="serializable")
    async def add(self, account: str, amount: int) -> int:
        row = await session().get(Account, account)
        assert row is not None
        row.balance += amount
        return row.balance

    @Transactional(type="RO", isolation="snapshot")
    async def balance(self, account: str) -> int:
        return (await session().execute(select(Account.balance).where(Account.id == account))).scalar_one()

    @Transactional(type="RO")
    async def try_write(self, account: str) -> None:
        session().add(Account(id=account, balance=1))

    @Transactional(type="RW")
    async def nested(self, account: str) -> int:
        await self.open(account, 5)  # joins this transaction
        return await self.add(account, 1)

    @Transactional(type="RW")
    async def open_then_fail(self, account: str) -> None:
        await self.open(account, 7)
        raise RuntimeError("boom after the insert")

    @Inbound(Deposit)
    @Outbound(Deposited)
    @Transactional(type="RW", isolation="serializable")
    async def on_deposit(self, ev: Deposit) -> Deposited:
        balance = await self.add(ev.account, ev.amount)
        return Deposited(account=ev.account, balance=balance)


@Bank.export
class Account(Bank.Model):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(primary_key=True)
    balance: Mapped[int]


class Audit(Bank.Model):
    """Private to the bank: no other service may read it."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str]


class Shop(Service, name="shop"):
    @Transactional(type="RW")
    async def record(self, order_id: str) -> None:
        session().add(Order(id=order_id))

    @Transactional(type="RW")
    async def steal(self, order_id: str) -> None:
        """Records an order, then writes into the bank's table: must fail as a whole."""
        session().add(Order(id=order_id))
        await session().flush()
        await session().execute(text("UPDATE bank.accounts SET balance = balance + 1000000"))

    @Transactional(type="RO")
    async def read_accounts(self) -> list[tuple[str, int]]:
        rows = await session().execute(select(Account.id, Account.balance).order_by(Account.id))
        return [(r.id, r.balance) for r in rows]

    @Transactional(type="RO")
    async def read_audit(self) -> list[str]:
        return list((await session().execute(select(Audit.note))).scalars())

    @Transactional(type="RO")
    async def orders(self) -> list[str]:
        return list((await session().execute(select(Order.id).order_by(Order.id))).scalars())


class Order(Shop.Model):
    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(primary_key=True)
