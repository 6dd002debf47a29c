"""Two services, two storage patterns (recovery paper §3): a bank whose wallets are event-sourced
and a shop that keeps plain rows, referencing each other.

- ``bank`` keeps each ``Wallet`` as the fold of its events (``Opened``, ``Deposited``, ``Paid``)
  in its log, ``bank.es_log``; paying a merchant records a reference to the shop's
  ``Merchant`` in that log, a ``vms.ref`` record carrying ``(URI, t, k)`` and a copy;
- ``shop`` keeps ``Merchant`` and ``Order`` rows; an order references the wallet that pays it in
  a reference column, with a cached copy of the wallet's state.

Run ``vmsdb services examples.wallets:app``; the integration tests restore either service from
an old backup and check both ways (tests/integration/test_event_sourcing.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Service, Transactional, session
from framework.event_sourcing import (
    EntityEvent,
    EventSourced,
    append,
    delete,
    load,
    log_of,
    release_reference,
    replay,
    take_reference,
)
from framework.references import Ref, get_reference, ref_column, referenceable


class Opened(EntityEvent):
    owner: str


class Deposited(EntityEvent):
    amount: int


class Paid(EntityEvent):
    merchant: str
    amount: int


class Bank(Service, name="bank"):
    @Transactional
    async def open(self, wallet_id: str, owner: str) -> None:
        await append(Wallet, wallet_id, Opened(owner=owner))

    @Transactional
    async def deposit(self, wallet_id: str, amount: int) -> int:
        wallet = await append(Wallet, wallet_id, Deposited(amount=amount))
        return int(wallet.balance)

    @Transactional
    async def pay(self, wallet_id: str, merchant_id: str, amount: int) -> Ref:
        """Pay a merchant: the payment is an event, the merchant a reference in the log."""
        await append(Wallet, wallet_id, Paid(merchant=merchant_id, amount=amount))
        _, ref = await take_reference(Wallet, wallet_id, Merchant, merchant_id, copy=True)
        return ref

    @Transactional
    async def release(self, seq: int) -> bool:
        """Give back the reference recorded at ``seq`` of the log (a ``vms.unref`` record)."""
        log = log_of(Bank)
        record = await session().get(log, seq)
        if record is None:
            return False
        return await release_reference(Wallet, record.key, seq)  # type: ignore[attr-defined]

    @Transactional
    async def close(self, wallet_id: str) -> bool:
        return await delete(Wallet, wallet_id)  # ⊥ in the log; the log keeps everything

    @Transactional(type="RO")
    async def wallet(self, wallet_id: str) -> dict[str, Any] | None:
        state = await load(Wallet, wallet_id)
        return None if state is None else state.model_dump()

    @Transactional(type="RO")
    async def replayed(self, wallet_id: str) -> dict[str, Any] | None:
        state = await replay(Wallet, wallet_id)
        return None if state is None else state.model_dump()


class Wallet(EventSourced, service=Bank, table="wallets"):
    owner: str = ""
    balance: int = 0
    payments: int = 0

    def apply(self, event: EntityEvent) -> None:
        if isinstance(event, Opened):
            self.owner = event.owner
        elif isinstance(event, Deposited):
            self.balance += event.amount
        elif isinstance(event, Paid):
            self.balance -= event.amount
            self.payments += 1


class Shop(Service, name="shop"):
    @Transactional
    async def add_merchant(self, merchant_id: str, name: str) -> None:
        row = await session().get(Merchant, merchant_id)
        if row is None:
            session().add(Merchant(id=merchant_id, name=name))
        else:
            row.name = name

    @Transactional
    async def place_order(self, order_id: str, wallet_id: str) -> Ref:
        """An order references the wallet that pays it, with a copy of the wallet's state."""
        ref = await get_reference(Wallet, wallet_id, copy=True)
        session().add(Order(id=order_id, wallet=ref))
        return ref


@referenceable
class Merchant(Shop.Model):
    __tablename__ = "merchants"
    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]


class Order(Shop.Model):
    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(primary_key=True)
    wallet: Mapped[Ref | None] = ref_column(Wallet)


SERVICES = [Bank, Shop]
app = App(SERVICES, create_tables=True)
