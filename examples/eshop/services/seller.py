"""Seller: sellers, one order entry per sold item, and the seller dashboard.

The dashboard is one read-only snapshot transaction: the aggregate (the benchmark's
``order_seller_view``) and the list of entries are read from the same snapshot, so the totals
always equal the sum of the entries returned with them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, String, func, select, update
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Service, Transactional, session
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
from vmsdb_eshop.services.common import as_row, clear, money_column, rows, timestamp_column, upsert

__all__ = ["VIEW_TOTALS", "OrderEntry", "Seller", "SellerRecord"]

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
        """One entry per invoiced item, under the item's seller."""
        for item in event.items:
            session().add(
                OrderEntry(
                    customer_id=event.customer_id,
                    order_id=event.order_id,
                    seller_id=item.seller_id,
                    product_id=item.product_id,
                    natural_key=f"{event.customer_id}_{event.order_id}",
                    product_name=item.product_name,
                    unit_price=item.unit_price,
                    quantity=item.quantity,
                    total_items=item.total_items,
                    total_amount=item.total_amount,
                    total_incentive=item.total_incentive,
                    freight_value=item.freight_value,
                    total_invoice=item.total_amount + item.freight_value,
                    order_status=OrderStatus.INVOICED,
                )
            )

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

    @Inbound(DeliveryNotification)
    @Transactional
    async def on_delivery(self, event: DeliveryNotification) -> None:
        await self._set(
            event.customer_id,
            event.order_id,
            OrderEntry.seller_id == event.seller_id,
            OrderEntry.product_id == event.product_id,
            package_id=event.package_id,
            delivery_date=event.delivery_date,
            delivery_status=event.status,
        )

    async def _set(self, customer_id: int, order_id: int, *where: ColumnElement[bool], **values: Any) -> None:
        await session().execute(
            update(OrderEntry)
            .where(OrderEntry.customer_id == customer_id, OrderEntry.order_id == order_id, *where)
            .values(**values)
        )

    @Transactional(type="RO", isolation="snapshot")
    async def dashboard(self, seller_id: int) -> dict[str, Any]:
        """``{sellerView: {...totals}, orderEntries: [...]}`` over the seller's open entries."""
        open_entries = (OrderEntry.seller_id == seller_id, OrderEntry.order_status.in_(OPEN_ORDER_STATUSES))
        (view,) = await rows(
            select(
                func.count(func.distinct(OrderEntry.natural_key)).label("count_orders"),
                func.count().label("count_items"),
                *(
                    func.coalesce(func.sum(getattr(OrderEntry, c)), 0).label(t)
                    for t, c in VIEW_TOTALS.items()
                ),
            ).where(*open_entries)
        )
        entries = await rows(
            select(OrderEntry.__table__)
            .where(*open_entries)
            .order_by(OrderEntry.customer_id, OrderEntry.order_id, OrderEntry.product_id)
        )
        return {"sellerView": {"seller_id": seller_id, **view}, "orderEntries": entries}

    @Transactional
    async def cleanup(self) -> None:
        await clear(OrderEntry)


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
