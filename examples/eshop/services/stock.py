"""Stock: quantities per (seller, product), leases for carts, reservations for checkouts.

The benchmark's quantities: ``qty_available`` is on hand (sold units leave it), ``qty_reserved``
is what checkouts reserved and payments have not settled yet. A reservation is
``qty_reserved += q`` (OUT_OF_STOCK when ``qty_reserved + q > qty_available``); PaymentConfirmed
is ``qty_available -= q, qty_reserved -= q, order_count += 1``; PaymentFailed releases the
reservation (``qty_reserved -= q``). Invariants: ``0 <= qty_reserved <= qty_available`` and
``initial = qty_available + sum of confirmed quantities``.

Add-to-cart leases (the paper's Listing 1) fit this model through one more column,
``qty_free = qty_available - qty_reserved`` at every commit: the ``@Lease``
decrements ``qty_free``, so the core grants carts only what is neither reserved nor held by
another cart's active lease; a checkout consumes the item's lease (``qty_free -= q``) in the
transaction that does ``qty_reserved += q``. Confirming leaves ``qty_free`` alone (both
``qty_available`` and ``qty_reserved`` drop by ``q``); a failed payment gives ``q`` back to it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import (
    CheckConstraint,
    ColumnElement,
    String,
    Update,
    and_,
    bindparam,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from framework import (
    Inbound,
    Lease,
    LeaseGrant,
    Outbound,
    Service,
    Transactional,
    connection,
    consume_leases,
    release_leases,
    send,
    session,
)
from vmsdb_eshop.events import (
    CheckoutMark,
    PaymentConfirmed,
    PaymentFailed,
    ProductUpdated,
    ProductUpdateMark,
    RejectedItem,
    ReserveStock,
    ReserveStockFailed,
    StockConfirmed,
)
from vmsdb_eshop.schemas import CartItem, ItemStatus, MarkStatus, StockRow
from vmsdb_eshop.services.common import (
    RowsInsert,
    as_row,
    clear,
    keys_in,
    keys_of,
    now,
    timestamp_column,
    upsert,
)

__all__ = ["Reservation", "Stock", "StockItem"]

#: A checkout that finds no usable lease takes the stock then and there: it leases the quantity
#: (so other carts' active leases are respected) and consumes it in the same transaction.
_SPOT_PERIOD = timedelta(minutes=1)


class Stock(Service, name="stock"):
    @Lease(
        "FROM StockItem s WHERE s.seller_id = :seller_id AND s.product_id = :product_id "
        "FOR UPDATE DECREMENT s.qty_free BY :qty WITH PERIOD :period"
    )
    async def hold(self, seller_id: int, product_id: int, qty: int, period: timedelta) -> LeaseGrant | None:
        """Hold ``qty`` of an item for ``period`` (add-to-cart); ``None`` if not that much is left."""
        ...

    @Transactional
    async def ingest(self, items: list[StockRow]) -> int:
        """Insert or replace stock rows as the benchmark's generator writes them.

        The ingested ``qty_available`` becomes the item's initial quantity (``/reset`` restores
        it); a row's ``qty_reserved`` is kept (the generator writes 0).
        """
        await upsert(
            StockItem,
            [
                {
                    **row.model_dump(),
                    "qty_free": row.qty_available - row.qty_reserved,
                    "qty_initial": row.qty_available,
                }
                for row in items
            ],
        )
        return len(items)

    @Transactional(type="RO")
    async def get(self, seller_id: int, product_id: int) -> dict[str, Any] | None:
        item = await session().get(StockItem, (seller_id, product_id))
        return None if item is None else as_row(item)

    # Read committed on purpose: the lease functions lock the stock row and then count the
    # active leases; each statement must see the leases others committed while it waited for
    # the lock, which a REPEATABLE READ snapshot taken earlier would not.
    @Inbound(ReserveStock)
    @Outbound([StockConfirmed, ReserveStockFailed, CheckoutMark])
    @Transactional(isolation="read_committed")
    async def reserve(self, event: ReserveStock) -> None:
        """Reserve each item: its version must be current and its quantity still there.

        A handful of statements however many items: lock the rows, consume the cart's leases,
        (lease on the spot what they no longer hold,) give back the leases of items that cannot
        be sold, record the reservations.
        """
        items = sorted(event.items, key=_key)
        versions = await self._lock(keys_of(items))
        # An unknown item or a replaced version cannot be sold (referential integrity).
        usable = [item for item in items if versions.get(_key(item)) == item.version]
        sellable = {_key(item) for item in usable}
        taken = await self._take(usable)
        # What the cart held of the others goes back (a refused lease held nothing any more).
        held = [i.lease_id for i in items if i.lease_id is not None and _key(i) not in sellable]
        await release_leases(held, granted_by=self.hold)
        reserved = [item for item in usable if _key(item) in taken]
        await self._record(event, reserved)
        rejected: list[RejectedItem] = list(event.dropped)  # what the cart left out, first
        for item in items:
            if _key(item) not in taken:
                status = ItemStatus.OUT_OF_STOCK if _key(item) in sellable else ItemStatus.UNAVAILABLE
                rejected.append(RejectedItem(**item.model_dump(), status=status))
        if reserved:
            send(
                StockConfirmed(
                    customer_id=event.customer_id,
                    tid=event.tid,
                    customer=event.customer,
                    items=reserved,
                    rejected=rejected,
                )
            )
        else:
            reasons = ", ".join(f"{r.seller_id}/{r.product_id} {r.status}" for r in rejected)
            send(ReserveStockFailed(customer_id=event.customer_id, tid=event.tid, items=rejected))
            send(CheckoutMark.of(event.tid, event.customer_id, MarkStatus.NOT_ACCEPTED, "stock", reasons))

    async def _lock(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """Lock the items' rows in key order, in one statement; their versions, by key.

        With ORDER BY, FOR UPDATE locks each row as the sorted rows come out: every transaction
        that locks several items (checkouts here, confirmations and cancellations below) takes
        them in ``(seller_id, product_id)`` order, so two of them sharing items wait for each
        other instead of deadlocking. (The lease functions lock one row each.)
        """
        found = await connection().execute(
            _LOCK,
            {
                "seller_id_list": [seller for seller, _ in keys],
                "product_id_list": [product for _, product in keys],
            },
        )
        return {(row.seller_id, row.product_id): row.version for row in found}

    async def _take(self, items: list[CartItem]) -> set[tuple[int, int]]:
        """Consume the items' leases; lease and consume on the spot for those without one left.

        Returns the keys of the items taken: for each, ``qty_free`` dropped by the quantity and
        the caller then raises ``qty_reserved``. Without a lease this is the benchmark's test
        ``qty_reserved + q <= qty_available``, made stricter by the quantity other carts' active
        leases hold (Listing 1). The cart's leases are consumed in one statement; a refused one
        (expired, released, reaped) changes nothing, and only those items are leased one by one.
        """
        leased = {_key(item): item.lease_id for item in items if item.lease_id is not None}
        settled = await consume_leases(leased.values(), granted_by=self.hold)
        taken = {key for key, lease in zip(leased, settled, strict=True) if lease.settled}
        spot: list[LeaseGrant] = []
        for item in items:
            if _key(item) in taken:
                continue
            grant = await self.hold(item.seller_id, item.product_id, item.quantity, _SPOT_PERIOD)
            if grant is not None:
                spot.append(grant)
                taken.add(_key(item))
        for lease in await consume_leases(spot):
            lease.raise_if_refused()  # granted in this very transaction: it cannot have ended
        return taken

    async def _record(self, event: ReserveStock, items: list[CartItem]) -> None:
        """Insert the reservations and raise the rows' ``qty_reserved``, in one statement."""
        if not items:
            return
        reservations = [
            {
                "tid": event.tid,
                "seller_id": item.seller_id,
                "product_id": item.product_id,
                "customer_id": event.customer_id,
                "quantity": item.quantity,
                "version": item.version,
                "lease_id": item.lease_id,
                "status": "reserved",
            }
            for item in items
        ]
        await connection().execute(_RESERVE, {**_RESERVATIONS.params(reservations), "at": now()})

    @Inbound(PaymentConfirmed)
    @Transactional
    async def confirm(self, event: PaymentConfirmed) -> None:
        """Sold: the reserved quantity leaves the stock for good (``qty_free`` is unchanged)."""
        await connection().execute(
            _CONFIRM, {"by_customer": event.customer_id, "by_tid": event.tid, "at": now()}
        )

    @Inbound(PaymentFailed)
    @Transactional
    async def cancel(self, event: PaymentFailed) -> None:
        """Not paid: the reservation is released, its quantity free again."""
        await connection().execute(
            _CANCEL, {"by_customer": event.customer_id, "by_tid": event.tid, "at": now()}
        )

    @Inbound(ProductUpdated, precedence=ReserveStock)
    @Outbound(ProductUpdateMark)
    @Transactional
    async def on_product_updated(self, event: ProductUpdated) -> None:
        """Take the product's new version: from now on, items of the old one are UNAVAILABLE.

        ``precedence=ReserveStock``: a replacement committed before a checkout's reservation
        request is applied before it, so the replaced version cannot be sold to that checkout.
        """
        await connection().execute(
            _NEW_VERSION,
            {
                "by_seller": event.seller_id,
                "by_product": event.product_id,
                "version": event.product.version,
                "product_revision": event.revision,
                "at": now(),
            },
        )
        if event.tid is not None:
            send(ProductUpdateMark.of(event.tid, event.seller_id, MarkStatus.SUCCESS, "stock"))

    @Transactional
    async def cleanup(self, *, restore: bool) -> None:
        """Forget reservations; with ``restore``, put every quantity back to its ingested value."""
        await clear(Reservation)
        if restore:
            await session().execute(
                update(StockItem).values(
                    qty_available=StockItem.qty_initial,
                    qty_reserved=0,
                    qty_free=StockItem.qty_initial,
                    ytd=0,
                    order_count=0,
                )
            )


def _key(item: CartItem) -> tuple[int, int]:
    return (item.seller_id, item.product_id)


class StockItem(Stock.Model):
    __tablename__ = "stock_items"
    __table_args__ = (
        CheckConstraint("qty_available >= 0", name="available_not_negative"),
        CheckConstraint("qty_reserved >= 0", name="reserved_not_negative"),
        CheckConstraint("qty_reserved <= qty_available", name="reserved_within_available"),
        # qty_free = qty_available - qty_reserved holds at commit, not after every statement
        # (the lease's consume and the reservation are two), so the checker verifies it.
        CheckConstraint("qty_free >= 0", name="free_not_negative"),
    )
    seller_id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(primary_key=True)
    qty_available: Mapped[int]
    qty_reserved: Mapped[int] = mapped_column(default=0)
    #: ``qty_available - qty_reserved``: what carts may lease (the @Lease's column).
    qty_free: Mapped[int]
    #: The ingested quantity: what ``/reset`` restores.
    qty_initial: Mapped[int]
    order_count: Mapped[int] = mapped_column(default=0)
    ytd: Mapped[int] = mapped_column(default=0)
    data: Mapped[str] = mapped_column(default="")
    version: Mapped[str] = mapped_column(String(200), default="0")
    product_revision: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = timestamp_column()
    updated_at: Mapped[datetime] = timestamp_column()


class Reservation(Stock.Model):
    """One checkout's hold on one item: reserved, then confirmed (sold) or cancelled."""

    __tablename__ = "reservations"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    tid: Mapped[str] = mapped_column(String(200), primary_key=True)
    seller_id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(primary_key=True)
    quantity: Mapped[int]
    version: Mapped[str] = mapped_column(String(200))
    lease_id: Mapped[UUID | None]
    status: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = timestamp_column()
    updated_at: Mapped[datetime] = timestamp_column()


# -- the hot statements, built once (see the cart's) -------------------------------------------


#: Lock the rows ``zip(:seller_id_list, :product_id_list)`` name, in key order; their versions.
_LOCK = (
    select(StockItem.seller_id, StockItem.product_id, StockItem.version)
    .where(keys_in(StockItem.seller_id, StockItem.product_id))
    .order_by(StockItem.seller_id, StockItem.product_id)
    .with_for_update()
)

_RESERVATIONS = RowsInsert(
    Reservation,
    ["tid", "seller_id", "product_id", "customer_id", "quantity", "version", "lease_id", "status"],
)


def _reserve() -> Update:
    """Insert the reservations (``_RESERVATIONS``) and raise the rows' ``qty_reserved``."""
    held = (
        _RESERVATIONS.statement.returning(Reservation.seller_id, Reservation.product_id, Reservation.quantity)
    ).cte("held")
    # The rows are locked (``_lock``): the order this UPDATE writes them in is free.
    return (
        update(StockItem)
        .where(StockItem.seller_id == held.c.seller_id, StockItem.product_id == held.c.product_id)
        .values(qty_reserved=StockItem.qty_reserved + held.c.quantity, updated_at=bindparam("at"))
    )


_RESERVE = _reserve()


def _settling(status: str, changes: Callable[[ColumnElement[int]], dict[str, ColumnElement[int]]]) -> Update:
    """Mark the checkout's open reservations ``status`` and apply ``changes`` (of each one's
    quantity) to their stock rows, in one statement; run with ``by_customer``, ``by_tid`` and
    ``at``.

    ``settled`` ends the reservations; ``locked`` then locks their stock rows in key order,
    as ``_lock`` does, so a confirmation and a checkout sharing items cannot deadlock (an
    UPDATE has no ORDER BY: on its own it would lock them in whatever order its join found
    them). The UPDATE writes only rows joined to ``locked``, so every row it writes was
    locked there first, whichever way Postgres joins them. MATERIALIZED: the locking query
    is run as written, never folded into the UPDATE.
    """
    settled = (
        update(Reservation)
        .where(
            Reservation.customer_id == bindparam("by_customer"),
            Reservation.tid == bindparam("by_tid"),
            Reservation.status == "reserved",
        )
        .values(status=status, updated_at=bindparam("at"))
        .returning(Reservation.seller_id, Reservation.product_id, Reservation.quantity)
        .cte("settled")
    )
    locked = (
        select(StockItem.seller_id, StockItem.product_id, settled.c.quantity)
        .join_from(
            StockItem,
            settled,
            and_(StockItem.seller_id == settled.c.seller_id, StockItem.product_id == settled.c.product_id),
        )
        .order_by(StockItem.seller_id, StockItem.product_id)
        .with_for_update(of=StockItem)
        .cte("locked")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    return (
        update(StockItem)
        .where(StockItem.seller_id == locked.c.seller_id, StockItem.product_id == locked.c.product_id)
        .values(**changes(locked.c.quantity), updated_at=bindparam("at"))
    )


#: Sold: the reserved quantity leaves the stock for good (``qty_free`` is unchanged).
_CONFIRM = _settling(
    "confirmed",
    lambda q: {
        "qty_available": StockItem.qty_available - q,
        "qty_reserved": StockItem.qty_reserved - q,
        "ytd": StockItem.ytd + q,
        "order_count": StockItem.order_count + 1,
    },
)
#: Not paid: the reservation is released, its quantity free again.
_CANCEL = _settling(
    "cancelled", lambda q: {"qty_reserved": StockItem.qty_reserved - q, "qty_free": StockItem.qty_free + q}
)

_NEW_VERSION = (
    update(StockItem)
    .where(
        StockItem.seller_id == bindparam("by_seller"),
        StockItem.product_id == bindparam("by_product"),
        StockItem.product_revision < bindparam("product_revision"),  # an older update never wins
    )
    .values(
        version=bindparam("version"),
        product_revision=bindparam("product_revision"),
        updated_at=bindparam("at"),
    )
)
