"""Seller: sellers, one order entry per sold item, the per-seller view, and the dashboard.

``order_seller_view`` is the benchmark's materialized view: per seller, the totals of its
in-progress entries (order status INVOICED, PAYMENT_PROCESSED, READY_FOR_SHIPMENT or IN_TRANSIT).
It is kept exact by maintaining it in the transaction that changes the entries: each handler
applies the difference its change makes (entries entering or leaving the in-progress set) as an
increment, computed in SQL by the same statement that changes the entries (``_count_in_view``):
one statement per event, whatever the number of items and sellers. Increments commute, and the
view row's lock orders concurrent writers of one seller, so no interleaving loses an update
(MarketplaceOnDapr's refresh is skipped under concurrency and its view goes stale; Orleans
serialises refreshes per seller instead).

The dashboard reads the view row and the entries in one read-only snapshot transaction, so the
totals always equal the sum of the entries returned with them.
"""

from __future__ import annotations

import functools
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    FromClause,
    Integer,
    String,
    bindparam,
    cast,
    false,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Service, Transactional, connection, session
from vmsdb_eshop.events import (
    DeliveryNotification,
    InvoiceIssued,
    PaymentConfirmed,
    PaymentFailed,
    ShipmentNotification,
)
from vmsdb_eshop.schemas import (
    AFTER_SHIPMENT,
    OPEN_ORDER_STATUSES,
    OrderStatus,
    SellerRow,
    ShipmentStatus,
)
from vmsdb_eshop.services.common import (
    OWN_KEY_GROUP,
    RowsInsert,
    as_row,
    clear,
    money_column,
    rows,
    timestamp_column,
    upsert,
)

__all__ = ["VIEW_TOTALS", "OrderEntry", "Seller", "SellerRecord", "SellerView"]

#: The totals of the seller view, and the entry column each one sums.
VIEW_TOTALS = {
    "total_amount": "total_amount",
    "total_freight": "freight_value",
    "total_incentive": "total_incentive",
    "total_invoice": "total_invoice",
    "total_items": "total_items",
}


class Seller(Service, name="seller"):
    @Transactional
    async def ingest(self, sellers: list[SellerRow]) -> int:
        await upsert(SellerRecord, [s.model_dump() for s in sellers])
        return len(sellers)

    @Transactional(type="RO")
    async def get(self, seller_id: int) -> dict[str, Any] | None:
        row = await session().get(SellerRecord, seller_id)
        return None if row is None else as_row(row)

    @Inbound(InvoiceIssued)
    @Transactional
    async def on_invoice(self, event: InvoiceIssued) -> None:
        """One entry per invoiced item, under the item's seller; the view counts them.

        One statement: the entries' INSERT ... RETURNING feeds the view's increments.
        """
        entries = [
            {
                "customer_id": event.customer_id,
                "order_id": event.order_id,
                "seller_id": item.seller_id,
                "product_id": item.product_id,
                "natural_key": f"{event.customer_id}_{event.order_id}",
                "product_name": item.product_name,
                "product_category": item.product_category,
                "unit_price": item.unit_price,
                "quantity": item.quantity,
                "total_items": item.total_items,
                "total_amount": item.total_amount,
                "total_incentive": item.total_incentive,
                "freight_value": item.freight_value,
                "total_invoice": item.total_amount + item.freight_value,
                "order_status": OrderStatus.INVOICED,
            }
            for item in event.items
        ]
        await connection().execute(_INVOICE, _ENTRIES.params(entries))

    @Inbound(PaymentConfirmed)
    @Transactional
    async def on_payment_confirmed(self, event: PaymentConfirmed) -> None:
        await self._set(event.customer_id, event.order_id, order_status=OrderStatus.PAYMENT_PROCESSED)

    @Inbound(PaymentFailed)
    @Transactional
    async def on_payment_failed(self, event: PaymentFailed) -> None:
        await self._set(event.customer_id, event.order_id, order_status=OrderStatus.PAYMENT_FAILED)

    @Inbound(ShipmentNotification)
    @Transactional
    async def on_shipment(self, event: ShipmentNotification) -> None:
        values: dict[str, Any] = {"order_status": AFTER_SHIPMENT[event.status]}
        if event.status is ShipmentStatus.APPROVED:
            values["shipment_date"] = event.event_date
        await self._set(event.customer_id, event.order_id, **values)

    @Inbound(DeliveryNotification, group_commit=OWN_KEY_GROUP)
    @Transactional
    async def on_delivery(self, event: DeliveryNotification) -> None:
        """Record the package's delivery on its entry; the order status, so the view, stays."""
        await connection().execute(
            _DELIVERED,
            {
                "by_customer": event.customer_id,
                "by_order": event.order_id,
                "by_seller": event.seller_id,
                "by_product": event.product_id,
                "package_id": event.package_id,
                "delivery_date": event.delivery_date,
                "delivery_status": event.status,
            },
        )

    async def _set(self, customer_id: int, order_id: int, **values: Any) -> None:
        """Update the order's entries and the view by the difference, in one statement."""
        statement = _setting(tuple(sorted(values)))
        await connection().execute(statement, {"by_customer": customer_id, "by_order": order_id, **values})

    @Transactional(type="RO", isolation="snapshot")
    async def dashboard(self, seller_id: int) -> dict[str, Any]:
        """``{sellerView: {...totals}, orderEntries: [...]}`` over the seller's open entries.

        Both come from one snapshot: the view row is what the entries' transactions left it.
        """
        view = await session().get(SellerView, seller_id)
        totals = {"count_orders": 0, "count_items": 0, **dict.fromkeys(VIEW_TOTALS, Decimal(0))}
        if view is not None:
            totals = {name: getattr(view, name) for name in totals}
        entries = await rows(
            select(OrderEntry.__table__)
            .where(OrderEntry.seller_id == seller_id, OrderEntry.order_status.in_(OPEN_ORDER_STATUSES))
            .order_by(OrderEntry.customer_id, OrderEntry.order_id, OrderEntry.product_id)
        )
        return {"sellerView": {"seller_id": seller_id, **totals}, "orderEntries": entries}

    @Transactional
    async def cleanup(self) -> None:
        await clear(OrderEntry, SellerView)


def _key_of(table: FromClause) -> list[ColumnElement[Any]]:
    return [table.c.customer_id, table.c.order_id, table.c.seller_id, table.c.product_id]


def _totals_of(table: FromClause) -> list[ColumnElement[Any]]:
    """The entry columns the view's totals sum."""
    return [table.c[column] for column in VIEW_TOTALS.values()]


def _count_in_view(changes: CTE, *, was_open: ColumnElement[bool]) -> Insert:
    """Add to each seller's view row what ``changes`` add to its totals.

    ``changes``: entries of one order, each with its seller, its ``order_status`` after the
    change, the total columns and what ``was_open`` reads (whether the entry was in progress
    before). An entry adds to the totals while it is in progress; the order counts once per
    seller while any of its entries there is in progress. A seller whose entries neither
    entered nor left the in-progress set gets no write (and so no lock).
    """
    # 1 where an entry is in progress (after the change, before it), else 0.
    moves = select(
        changes.c.seller_id,
        cast(changes.c.order_status.in_(OPEN_ORDER_STATUSES), Integer).label("is_open"),
        cast(was_open, Integer).label("was_open"),
        *_totals_of(changes),
    ).subquery("moves")
    sign = moves.c.is_open - moves.c.was_open  # +1 entered, -1 left, 0 stayed
    increments = (
        select(
            moves.c.seller_id,
            (func.max(moves.c.is_open) - func.max(moves.c.was_open)).label("count_orders"),
            func.sum(sign).label("count_items"),
            *(func.sum(sign * moves.c[column]).label(total) for total, column in VIEW_TOTALS.items()),
        )
        .group_by(moves.c.seller_id)
        .having(func.bool_or(moves.c.is_open != moves.c.was_open))
        .order_by(moves.c.seller_id)  # one lock order: concurrent writers cannot deadlock
    )
    names = ["seller_id", "count_orders", "count_items", *VIEW_TOTALS]
    statement = insert(SellerView).from_select(names, increments)
    return statement.on_conflict_do_update(
        index_elements=["seller_id"],
        set_={name: getattr(SellerView, name) + statement.excluded[name] for name in names[1:]},
    )


@functools.cache
def _setting(names: tuple[str, ...]) -> Insert:
    """:meth:`Seller._set` of the columns ``names``, built once per set of columns: run with
    ``by_customer``, ``by_order`` and a value per name."""
    table = OrderEntry.__table__
    # Lock the entries first: the difference is computed from the rows as they were (under
    # read committed, FOR UPDATE reads the latest version of a row it waited for).
    before = (
        select(*_key_of(table), table.c.order_status)
        .where(table.c.customer_id == bindparam("by_customer"), table.c.order_id == bindparam("by_order"))
        .with_for_update()
        .cte("before")
    )
    changed = (
        update(table)
        .where(*(column == before.c[column.name] for column in _key_of(table)))
        .values({name: bindparam(name) for name in names})
        .returning(
            table.c.seller_id,
            table.c.order_status,
            before.c.order_status.label("was"),
            *_totals_of(table),
        )
        .cte("changed")
    )
    return _count_in_view(changed, was_open=changed.c.was.in_(OPEN_ORDER_STATUSES))


class SellerRecord(Seller.Model):
    __tablename__ = "sellers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(default="")
    company_name: Mapped[str] = mapped_column(default="")
    email: Mapped[str] = mapped_column(default="")
    phone: Mapped[str] = mapped_column(default="")
    mobile_phone: Mapped[str] = mapped_column(default="")
    cpf: Mapped[str] = mapped_column(default="")
    cnpj: Mapped[str] = mapped_column(default="")
    address: Mapped[str] = mapped_column(default="")
    complement: Mapped[str] = mapped_column(default="")
    city: Mapped[str] = mapped_column(default="")
    state: Mapped[str] = mapped_column(default="")
    zip_code: Mapped[str] = mapped_column(default="")


class OrderEntry(Seller.Model):
    __tablename__ = "order_entries"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    seller_id: Mapped[int] = mapped_column(primary_key=True, index=True)
    product_id: Mapped[int] = mapped_column(primary_key=True)
    natural_key: Mapped[str] = mapped_column(String(100))
    package_id: Mapped[int | None]
    product_name: Mapped[str] = mapped_column(default="")
    product_category: Mapped[str] = mapped_column(default="")
    unit_price: Mapped[Decimal] = money_column()
    quantity: Mapped[int]
    total_items: Mapped[Decimal] = money_column()
    total_amount: Mapped[Decimal] = money_column()
    total_incentive: Mapped[Decimal] = money_column()
    total_invoice: Mapped[Decimal] = money_column()
    freight_value: Mapped[Decimal] = money_column()
    shipment_date: Mapped[datetime | None] = timestamp_column(nullable=True)
    delivery_date: Mapped[datetime | None] = timestamp_column(nullable=True)
    order_status: Mapped[str] = mapped_column(String(30))
    delivery_status: Mapped[str | None] = mapped_column(String(30))


class SellerView(Seller.Model):
    """``order_seller_view``: per seller, the totals of its in-progress order entries."""

    __tablename__ = "order_seller_view"
    seller_id: Mapped[int] = mapped_column(primary_key=True)
    count_orders: Mapped[int] = mapped_column(default=0)
    count_items: Mapped[int] = mapped_column(default=0)
    total_amount: Mapped[Decimal] = money_column()
    total_freight: Mapped[Decimal] = money_column()
    total_incentive: Mapped[Decimal] = money_column()
    total_invoice: Mapped[Decimal] = money_column()
    total_items: Mapped[Decimal] = money_column()


# -- the hot statements, built once (see the cart's) -------------------------------------------

_ENTRIES = RowsInsert(
    OrderEntry,
    [
        "customer_id",
        "order_id",
        "seller_id",
        "product_id",
        "natural_key",
        "product_name",
        "product_category",
        "unit_price",
        "quantity",
        "total_items",
        "total_amount",
        "total_incentive",
        "freight_value",
        "total_invoice",
        "order_status",
    ],
)
#: The entries' INSERT ... RETURNING feeds the view's increments: one statement.
_INVOICE = _count_in_view(
    _ENTRIES.statement.returning(
        OrderEntry.__table__.c.seller_id,
        OrderEntry.__table__.c.order_status,
        *_totals_of(OrderEntry.__table__),
    ).cte("entries"),
    was_open=false(),
)

_DELIVERED = (
    update(OrderEntry)
    .where(
        OrderEntry.customer_id == bindparam("by_customer"),
        OrderEntry.order_id == bindparam("by_order"),
        OrderEntry.seller_id == bindparam("by_seller"),
        OrderEntry.product_id == bindparam("by_product"),
    )
    .values(
        package_id=bindparam("package_id"),
        delivery_date=bindparam("delivery_date"),
        delivery_status=bindparam("delivery_status"),
    )
)
