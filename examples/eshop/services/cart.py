"""Cart: customers' carts, the stock leases their items hold, and a replica of the products.

Add-to-cart leases the item's quantity from the stock (``@Lease``, through the ``stock`` handle)
and keeps the lease id with the item; checkout hands the leases to the stock, which consumes
them. The product replica follows ProductUpdated and PriceUpdated, guarded by the product's
revision, and both handlers take ``precedence`` over checkout: a checkout sees every product
change committed before it.

Checkout follows the benchmark: the cart becomes CHECKOUT_SENT; an item whose replica shows the
same version at a different price is dropped (PRICE_DIVERGENCE), one whose product was deleted
(DELETED) or replaced (UNAVAILABLE) too; the others go to the stock at the price the cart holds
(a price update of the item's version has already rewritten it).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import String, delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Outbound, Service, Transactional, release_lease, send, session
from vmsdb_eshop.config import settings
from vmsdb_eshop.events import (
    CheckoutMark,
    CheckoutRequest,
    PriceUpdated,
    PriceUpdateMark,
    ProductUpdated,
    RejectedItem,
    ReserveStock,
)
from vmsdb_eshop.schemas import CartItem, CartItemFields, CartStatus, ItemStatus, MarkStatus
from vmsdb_eshop.services.common import (
    as_row,
    clear,
    money_column,
    now,
    rows,
    settle_quietly,
    timestamp_column,
)
from vmsdb_eshop.services.stock import Stock

__all__ = ["Cart", "CartHistory", "CartLine", "CartRecord", "CheckoutClaim", "ReplicaProduct"]


class Cart(Service, name="cart"):
    stock: Stock

    # Read committed: the lease grant runs in this transaction and must see leases committed
    # while it waited for the stock row's lock (see Stock.reserve).
    @Transactional(isolation="read_committed")
    async def add_item(self, customer_id: int, item: CartItemFields) -> dict[str, Any]:
        """Put ``item`` in the cart, holding its quantity with a stock lease when there is enough.

        Adding a product that is already in the cart replaces it (and its lease).
        """
        s = session()
        opened = insert(CartRecord).values(customer_id=customer_id, status=CartStatus.OPEN)
        await s.execute(
            opened.on_conflict_do_update(
                index_elements=["customer_id"], set_={"status": CartStatus.OPEN, "updated_at": now()}
            )
        )
        line = await s.get(CartLine, (customer_id, item.seller_id, item.product_id))
        if line is not None and line.lease_id is not None:
            await settle_quietly(release_lease, line.lease_id)
        grant = await self.stock.hold(item.seller_id, item.product_id, item.quantity, settings().lease_period)
        values = {**item.model_dump(), "lease_id": None if grant is None else grant.id}
        if line is None:
            line = CartLine(customer_id=customer_id, **values)
            s.add(line)
        else:
            for name, value in values.items():
                setattr(line, name, value)
        await s.flush()
        return {**as_row(line), "reserved": grant is not None}

    @Transactional(isolation="read_committed")
    async def claim_checkout(self, customer_id: int, tid: str) -> int:
        """Bind checkout id ``tid`` to ``customer_id`` unless it is bound already; its customer.

        A checkout's events and outcome are found by its id, so an id must name one customer's
        checkout: the route refuses an id whose customer is someone else. (Read committed: a
        concurrent claim of the same id waits for the first to commit, then reads its row.)
        """
        s = session()
        await s.execute(
            insert(CheckoutClaim)
            .values(tid=tid, customer_id=customer_id)
            .on_conflict_do_nothing(index_elements=["tid"])
        )
        owner = await s.scalar(select(CheckoutClaim.customer_id).where(CheckoutClaim.tid == tid))
        return int(owner) if owner is not None else customer_id

    @Transactional
    async def seal(self, customer_id: int) -> int:
        """Empty the cart and give its leases back; returns how many items were dropped."""
        await session().execute(
            update(CartRecord).where(CartRecord.customer_id == customer_id).values(status=CartStatus.OPEN)
        )
        dropped = await rows(
            delete(CartLine).where(CartLine.customer_id == customer_id).returning(CartLine.lease_id)
        )
        for line in dropped:
            if line["lease_id"] is not None:
                await settle_quietly(release_lease, line["lease_id"])
        return len(dropped)

    @Transactional(type="RO")
    async def get(self, customer_id: int) -> dict[str, Any] | None:
        cart = await session().get(CartRecord, customer_id)
        if cart is None:
            return None
        items = await rows(select(CartLine.__table__).where(CartLine.customer_id == customer_id))
        return {**as_row(cart), "items": items}

    @Transactional(type="RO")
    async def history(self, customer_id: int, tid: str) -> list[dict[str, Any]]:
        """The items checked out by transaction ``tid`` (the driver's anomaly check reads it)."""
        table = CartHistory.__table__
        return await rows(select(table).where(table.c.customer_id == customer_id, table.c.tid == tid))

    @Inbound(CheckoutRequest)
    @Outbound([ReserveStock, CheckoutMark])
    @Transactional
    async def checkout(self, event: CheckoutRequest) -> None:
        """Drop diverged or deleted items, record the rest, empty the cart, ask the stock."""
        s = session()
        lines = (
            await s.scalars(
                select(CartLine)
                .where(CartLine.customer_id == event.customer_id)
                .order_by(CartLine.seller_id, CartLine.product_id)
            )
        ).all()
        if not lines:
            send(CheckoutMark.of(event.tid, event.customer_id, MarkStatus.NOT_ACCEPTED, "cart", "empty cart"))
            return
        replicas = await self._replicas(lines)
        items: list[CartItem] = []
        dropped: list[RejectedItem] = []
        for line in lines:
            status = _status(line, replicas.get((line.seller_id, line.product_id)))
            if status is ItemStatus.IN_STOCK:
                items.append(CartItem(**_fields(line)))
                continue
            dropped.append(RejectedItem(**_fields(line), status=status))
            if line.lease_id is not None:
                await settle_quietly(release_lease, line.lease_id)
        for item in items:
            s.add(CartHistory(customer_id=event.customer_id, tid=event.tid, **item.model_dump()))
        await s.execute(delete(CartLine).where(CartLine.customer_id == event.customer_id))
        await s.execute(
            update(CartRecord)
            .where(CartRecord.customer_id == event.customer_id)
            .values(status=CartStatus.CHECKOUT_SENT, updated_at=now())
        )
        if not items:
            why = ", ".join(f"{d.seller_id}/{d.product_id} {d.status}" for d in dropped)
            send(CheckoutMark.of(event.tid, event.customer_id, MarkStatus.NOT_ACCEPTED, "cart", why))
            return
        send(
            ReserveStock(
                customer_id=event.customer_id,
                tid=event.tid,
                customer=event.checkout,
                items=items,
                dropped=dropped,
            )
        )

    async def _replicas(self, lines: Sequence[CartLine]) -> dict[tuple[int, int], ReplicaProduct]:
        """The replica of each line's product, by (seller, product)."""
        keys = [(line.seller_id, line.product_id) for line in lines]
        replicas = await session().scalars(
            select(ReplicaProduct).where(
                tuple_(ReplicaProduct.seller_id, ReplicaProduct.product_id).in_(keys)
            )
        )
        return {(r.seller_id, r.product_id): r for r in replicas}

    @Inbound(PriceUpdated, precedence=CheckoutRequest)
    @Outbound(PriceUpdateMark)
    @Transactional
    async def on_price_updated(self, event: PriceUpdated) -> None:
        """Apply a newer price of the replica's version to the replica and to open carts."""
        applied = await rows(
            update(ReplicaProduct)
            .where(
                ReplicaProduct.seller_id == event.seller_id,
                ReplicaProduct.product_id == event.product_id,
                ReplicaProduct.version == event.version,
                ReplicaProduct.revision < event.revision,  # an older update never wins
            )
            .values(price=event.price, revision=event.revision, updated_at=now())
            .returning(ReplicaProduct.revision)
        )
        if applied:
            await session().execute(
                update(CartLine)
                .where(
                    CartLine.seller_id == event.seller_id,
                    CartLine.product_id == event.product_id,
                    CartLine.version == event.version,
                )
                .values(unit_price=event.price)
            )
        send(PriceUpdateMark.of(event.tid, event.seller_id, MarkStatus.SUCCESS, "cart"))

    @Inbound(ProductUpdated, precedence=CheckoutRequest)
    @Transactional
    async def on_product_updated(self, event: ProductUpdated) -> None:
        """Upsert the replica, unless it already holds a newer revision."""
        product = event.product
        values = {
            "seller_id": event.seller_id,
            "product_id": event.product_id,
            "name": product.name,
            "price": product.price,
            "freight_value": product.freight_value,
            "version": product.version,
            "active": event.active,
            "revision": event.revision,
            "updated_at": now(),
        }
        statement = insert(ReplicaProduct).values(values)
        await session().execute(
            statement.on_conflict_do_update(
                index_elements=["seller_id", "product_id"],
                set_={k: statement.excluded[k] for k in values if k not in ("seller_id", "product_id")},
                where=ReplicaProduct.revision < statement.excluded.revision,
            )
        )

    @Transactional
    async def cleanup(self) -> None:
        """Release every lease, empty every cart and forget the history."""
        for line in await rows(select(CartLine.lease_id).where(CartLine.lease_id.is_not(None))):
            await settle_quietly(release_lease, line["lease_id"])
        await clear(CartLine, CartHistory, CartRecord)


def _status(line: CartLine, replica: ReplicaProduct | None) -> ItemStatus:
    """Whether checkout sends ``line`` to the stock (IN_STOCK) or drops it, and why.

    The replica is never behind what a checkout must see: a price update is acknowledged only
    after the cart applied it (a replacement after the stock did), and the cart's handlers of
    both take precedence over checkout, so every change committed before a checkout reaches the
    replica first.
    So a line at another version than the replica's is of a replaced version (UNAVAILABLE, as
    the stock would answer), and one at the replica's version but another price was added with a
    stale price (PRICE_DIVERGENCE). Dropping the first here, not only at the stock, keeps a stale
    line out of the checkout's history: without it a cart could hold x at a price older than an
    update acknowledged before y's, the benchmark's causal anomaly. An unknown product is left to
    the stock.
    """
    if replica is None:
        return ItemStatus.IN_STOCK
    if not replica.active:
        return ItemStatus.DELETED
    if replica.version != line.version:
        return ItemStatus.UNAVAILABLE
    if replica.price != line.unit_price:
        return ItemStatus.PRICE_DIVERGENCE
    return ItemStatus.IN_STOCK


def _fields(line: CartLine) -> dict[str, Any]:
    return {name: getattr(line, name) for name in CartItem.model_fields}


class CartRecord(Cart.Model):
    __tablename__ = "carts"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default=CartStatus.OPEN)
    created_at: Mapped[datetime] = timestamp_column()
    updated_at: Mapped[datetime] = timestamp_column()


class _ItemColumns:
    """The columns of a cart item, shared by open carts and the checkout history."""

    seller_id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(primary_key=True)
    product_name: Mapped[str] = mapped_column(default="")
    unit_price: Mapped[Decimal] = money_column()
    freight_value: Mapped[Decimal] = money_column()
    quantity: Mapped[int]
    voucher: Mapped[Decimal] = money_column()
    version: Mapped[str] = mapped_column(String(200), default="0")
    lease_id: Mapped[UUID | None]


class CartLine(_ItemColumns, Cart.Model):
    __tablename__ = "cart_items"
    customer_id: Mapped[int] = mapped_column(primary_key=True)


class CartHistory(_ItemColumns, Cart.Model):
    """What each checkout took out of the cart, at the prices it was charged."""

    __tablename__ = "cart_history"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    tid: Mapped[str] = mapped_column(String(200), primary_key=True)


class CheckoutClaim(Cart.Model):
    """Which customer each checkout id (``instanceId``) belongs to; kept across ``/cleanup``,
    as the id keeps naming that checkout's events in the log."""

    __tablename__ = "checkout_ids"
    tid: Mapped[str] = mapped_column(String(200), primary_key=True)
    customer_id: Mapped[int]
    created_at: Mapped[datetime] = timestamp_column()


class ReplicaProduct(Cart.Model):
    """The cart's replica of product (name, price, version), kept by product events."""

    __tablename__ = "replica_products"
    seller_id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(default="")
    price: Mapped[Decimal] = money_column()
    freight_value: Mapped[Decimal] = money_column()
    version: Mapped[str] = mapped_column(String(200), default="0")
    active: Mapped[bool] = mapped_column(default=True)
    revision: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = timestamp_column()
