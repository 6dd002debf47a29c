"""Order: turns reserved items into an invoiced order and follows it to delivery.

Discounts come from the customer service through ``@Query`` (the paper's Listing 1): the
query runs inside the order's transaction and reads the customer's exported tables, which the
order service could not read (let alone write) otherwise.

Each order references its customer and each order line its product (G9): ``get_references`` in
the invoicing transaction counts the references, all in one statement, and caches a copy of each
row, so that a restored customer or product service can recover lost rows from the orders'
copies (G10). An entity that is gone (not found, or deleted) leaves the reference empty and
counts nothing: the order goes on.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Identity, String, bindparam, select, update
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Outbound, Query, Service, Transactional, connection, send, session
from framework.references import Ref, delete_reference, get_references, ref_column
from vmsdb_eshop.events import (
    InvoiceIssued,
    PaymentConfirmed,
    PaymentFailed,
    ShipmentNotification,
    StockConfirmed,
)
from vmsdb_eshop.schemas import (
    AFTER_SHIPMENT,
    CartItem,
    DiscountRow,
    OrderItem,
    OrderStatus,
    ShipmentStatus,
)
from vmsdb_eshop.services.common import (
    OWN_KEY_GROUP,
    RowsInsert,
    clear,
    money,
    money_column,
    nested,
    now,
    timestamp_column,
)
from vmsdb_eshop.services.customer import CustomerRecord
from vmsdb_eshop.services.product import ProductRecord

__all__ = ["Order", "OrderHistory", "OrderLine", "OrderRecord", "invoice_line"]

#: Deadlines an invoice sets (the benchmark leaves them to the implementation): the seller hands
#: each item to the carrier within SHIPPING_LIMIT, the customer expects it within DELIVERY_ESTIMATE.
SHIPPING_LIMIT = timedelta(days=3)
DELIVERY_ESTIMATE = timedelta(days=7)

#: What an order keeps of its customer and a line of its product: the whole row. A restore
#: re-inserts lost rows from these copies, and a partial copy cannot fill the NOT NULL columns
#: (their defaults are client-side), so the copy must be complete.
CUSTOMER_COPY: bool | list[str] = True
PRODUCT_COPY: bool | list[str] = True


#: An entity to reference: its model, its key and what to copy of it.
Target = tuple[type, tuple[object, ...], bool | list[str]]


async def reference(target: type, *key: object, copy: bool | list[str]) -> Ref | None:
    """A reference to ``target``'s entity ``key`` with a cached copy; ``None`` if it is gone."""
    [ref] = await references([(target, key, copy)])
    return ref


async def references(targets: list[Target]) -> list[Ref | None]:
    """:func:`reference` of each target, in order, in one statement: an entity that is gone is
    ``None`` and counts nothing, and the order's transaction goes on (no savepoint needed)."""
    return [taken.ref for taken in await get_references(targets)]


def invoice_line(
    item: CartItem, discount_percent: int, *, category: str = "", shipping_limit: datetime | None = None
) -> OrderItem:
    """Totals of one item: the voucher plus the customer's discount, capped at the item total."""
    total_items = money(item.unit_price * item.quantity)
    incentive = min(total_items, money(item.voucher + total_items * discount_percent / Decimal(100)))
    return OrderItem(
        seller_id=item.seller_id,
        product_id=item.product_id,
        product_name=item.product_name,
        unit_price=item.unit_price,
        freight_value=item.freight_value,
        quantity=item.quantity,
        version=item.version,
        total_items=total_items,
        total_amount=total_items - incentive,
        total_incentive=incentive,
        product_category=category,
        shipping_limit_date=shipping_limit,
    )


class Order(Service, name="order"):
    @Query(
        "FROM CustomerDiscount cd, CustomerRecord c JOIN c.id = cd.customer_id "
        "WHERE c.id = :customer_id AND cd.seller_id IN (:items[seller_id]) AND cd.expired() = FALSE"
    )
    async def find_discounts(self, customer_id: int, items: list[CartItem]) -> list[DiscountRow]:
        """The customer's unexpired discounts at the sellers of ``items``."""
        ...

    @Inbound(StockConfirmed)
    @Outbound(InvoiceIssued)
    @Transactional
    async def on_stock_confirmed(self, event: StockConfirmed) -> None:
        """Invoice the reserved items: totals, discounts, next order id, invoice number."""
        discounts = {
            d.seller_id: d.percent for d in await self.find_discounts(event.customer_id, event.items)
        }
        issued = now()
        *products, customer = await references(
            [(ProductRecord, (item.seller_id, item.product_id), PRODUCT_COPY) for item in event.items]
            + [(CustomerRecord, (event.customer_id,), CUSTOMER_COPY)]
        )
        items = [
            invoice_line(
                item,
                discounts.get(item.seller_id, 0),
                category=str(product.copy.get("category", "")) if product and product.copy else "",
                shipping_limit=issued + SHIPPING_LIMIT,
            )
            for item, product in zip(event.items, products, strict=True)
        ]
        order_id = await self._next_order_id(event.customer_id)
        total_amount = sum((i.total_amount for i in items), Decimal(0))
        total_freight = sum((i.freight_value for i in items), Decimal(0))
        key = {"customer_id": event.customer_id, "order_id": order_id}
        invoice_number = f"{event.customer_id}-{issued:%Y%m%d}-{order_id}"
        order = {
            **key,
            "tid": event.tid,
            "invoice_number": invoice_number,
            "status": OrderStatus.INVOICED,
            "purchase_date": issued,
            "estimated_delivery_date": issued + DELIVERY_ESTIMATE,
            "count_items": len(items),
            "total_items": sum((i.total_items for i in items), Decimal(0)),
            "total_incentive": sum((i.total_incentive for i in items), Decimal(0)),
            "total_amount": total_amount,
            "total_freight": total_freight,
            "total_invoice": total_amount + total_freight,
            "customer": customer,
        }
        lines = [
            {**key, "order_item_id": n, "product": product, **item.model_dump(exclude={"product_category"})}
            for n, (item, product) in enumerate(zip(items, products, strict=True), start=1)
        ]
        # One statement: the order and its first history row are CTEs of the lines' INSERT.
        await connection().execute(
            _INVOICE, {**{f"orders_{name}": value for name, value in order.items()}, **_LINES.params(lines)}
        )
        send(
            InvoiceIssued(
                customer_id=event.customer_id,
                tid=event.tid,
                order_id=order_id,
                customer=event.customer,
                invoice_number=invoice_number,
                issue_date=issued,
                total_invoice=total_amount + total_freight,
                items=items,
            )
        )

    async def _next_order_id(self, customer_id: int) -> int:
        """The customer's next order id (1, 2, ...), counted in the order service's own table."""
        return int((await connection().execute(_NEXT_ORDER_ID, {"customer_id": customer_id})).scalar_one())

    @Inbound(PaymentConfirmed, group_commit=OWN_KEY_GROUP)
    @Transactional
    async def on_payment_confirmed(self, event: PaymentConfirmed) -> None:
        await self._advance(
            event.customer_id, event.order_id, OrderStatus.PAYMENT_PROCESSED, payment_date=event.date
        )

    @Inbound(PaymentFailed, group_commit=OWN_KEY_GROUP)
    @Transactional
    async def on_payment_failed(self, event: PaymentFailed) -> None:
        await self._advance(event.customer_id, event.order_id, OrderStatus.PAYMENT_FAILED)

    @Inbound(ShipmentNotification, group_commit=OWN_KEY_GROUP)
    @Transactional
    async def on_shipment(self, event: ShipmentNotification) -> None:
        dates: dict[str, datetime] = {}
        if event.status is ShipmentStatus.DELIVERY_IN_PROGRESS:
            dates["delivered_carrier_date"] = event.event_date
        elif event.status is ShipmentStatus.CONCLUDED:
            dates["delivered_customer_date"] = event.event_date
        await self._advance(event.customer_id, event.order_id, AFTER_SHIPMENT[event.status], **dates)

    async def _advance(self, customer_id: int, order_id: int, status: OrderStatus, **dates: Any) -> None:
        """Move the order to ``status`` and record it in its history, in one statement."""
        params = {"by_customer": customer_id, "by_order": order_id, "status": status, "at": now(), **dates}
        await connection().execute(_advancing(tuple(sorted(dates))), params)

    @Transactional(type="RO", isolation="snapshot")
    async def orders_of(self, customer_id: int) -> list[dict[str, Any]]:
        """The customer's orders, each with its items (one snapshot)."""
        return await nested(
            select(OrderRecord.__table__)
            .where(OrderRecord.customer_id == customer_id)
            .order_by(OrderRecord.order_id),
            select(OrderLine.__table__)
            .where(OrderLine.customer_id == customer_id)
            .order_by(OrderLine.order_id, OrderLine.order_item_id),
            "items",
        )

    @Transactional
    async def cleanup(self) -> None:
        """Give every reference back (or the entities' counts stay up), then delete every row."""
        for column in (OrderRecord.customer, OrderLine.product):
            for ref in (await session().scalars(select(column).where(column.is_not(None)))).all():
                if ref is not None:
                    await delete_reference(ref)
        await clear(OrderLine, OrderHistory, OrderRecord, CustomerOrders)


class CustomerOrders(Order.Model):
    __tablename__ = "customer_orders"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    next_order_id: Mapped[int]


class OrderRecord(Order.Model):
    __tablename__ = "orders"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    tid: Mapped[str] = mapped_column(String(200), index=True)
    invoice_number: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(30))
    purchase_date: Mapped[datetime] = timestamp_column()
    payment_date: Mapped[datetime | None] = timestamp_column(nullable=True)
    delivered_carrier_date: Mapped[datetime | None] = timestamp_column(nullable=True)
    delivered_customer_date: Mapped[datetime | None] = timestamp_column(nullable=True)
    estimated_delivery_date: Mapped[datetime | None] = timestamp_column(nullable=True)
    count_items: Mapped[int]
    total_amount: Mapped[Decimal] = money_column()
    total_freight: Mapped[Decimal] = money_column()
    total_incentive: Mapped[Decimal] = money_column()
    total_invoice: Mapped[Decimal] = money_column()
    total_items: Mapped[Decimal] = money_column()
    created_at: Mapped[datetime] = timestamp_column()
    updated_at: Mapped[datetime] = timestamp_column()
    #: The customer (G9), with a copy of the customer's row; ``None`` if it was gone.
    customer: Mapped[Ref | None] = ref_column(CustomerRecord)


class OrderLine(Order.Model):
    __tablename__ = "order_items"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    order_item_id: Mapped[int] = mapped_column(primary_key=True)
    seller_id: Mapped[int]
    product_id: Mapped[int]
    product_name: Mapped[str] = mapped_column(default="")
    unit_price: Mapped[Decimal] = money_column()
    freight_value: Mapped[Decimal] = money_column()
    quantity: Mapped[int]
    version: Mapped[str] = mapped_column(String(200))
    total_items: Mapped[Decimal] = money_column()
    total_amount: Mapped[Decimal] = money_column()
    total_incentive: Mapped[Decimal] = money_column()
    shipping_limit_date: Mapped[datetime | None] = timestamp_column(nullable=True)
    #: The product (G9), with a copy of the product's row; ``None`` if it was gone.
    product: Mapped[Ref | None] = ref_column(ProductRecord)


class OrderHistory(Order.Model):
    __tablename__ = "order_history"
    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    customer_id: Mapped[int]
    order_id: Mapped[int]
    status: Mapped[str] = mapped_column(String(30))
    created_at: Mapped[datetime] = timestamp_column()


# -- the hot statements, built once (see the cart's) -------------------------------------------

_NEXT_ORDER_ID = (
    insert(CustomerOrders)
    .values(customer_id=bindparam("customer_id"), next_order_id=1)
    .on_conflict_do_update(
        index_elements=["customer_id"], set_={"next_order_id": CustomerOrders.next_order_id + 1}
    )
    .returning(CustomerOrders.next_order_id)
)

_LINES = RowsInsert(
    OrderLine,
    [
        "customer_id",
        "order_id",
        "order_item_id",
        "product",
        *(name for name in OrderItem.model_fields if name != "product_category"),
    ],
)


#: What an invoiced order is written with (the dates of its later moves come with them).
_ORDER_COLUMNS = (
    "customer_id",
    "order_id",
    "tid",
    "invoice_number",
    "status",
    "purchase_date",
    "estimated_delivery_date",
    "count_items",
    "total_items",
    "total_incentive",
    "total_amount",
    "total_freight",
    "total_invoice",
    "customer",
)


def _invoice() -> Insert:
    """The order (parameters ``orders_<column>``), its history row and its lines (``_LINES``)."""
    order = insert(OrderRecord.__table__).values(
        {name: bindparam(f"orders_{name}") for name in _ORDER_COLUMNS}
    )
    history = insert(OrderHistory.__table__).values(
        customer_id=bindparam("orders_customer_id"),
        order_id=bindparam("orders_order_id"),
        status=bindparam("orders_status"),
    )
    return _LINES.statement.add_cte(order.cte("new_order"), history.cte("history"))


_INVOICE = _invoice()


@functools.cache
def _advancing(dates: tuple[str, ...]) -> Insert:
    """:meth:`Order._advance` setting the columns ``dates`` too, built once per set of them:
    the order's move to ``status`` and its history row, in one statement."""
    table = OrderRecord.__table__
    moved = (
        update(table)
        .where(table.c.customer_id == bindparam("by_customer"), table.c.order_id == bindparam("by_order"))
        .values(status=bindparam("status"), updated_at=bindparam("at"), **{d: bindparam(d) for d in dates})
    )
    history = insert(OrderHistory.__table__).values(
        customer_id=bindparam("by_customer"), order_id=bindparam("by_order"), status=bindparam("status")
    )
    return history.add_cte(moved.cte("moved"))
