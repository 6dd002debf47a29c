"""Shipment: one shipment per paid order, one package per item, and the carrier's deliveries.

A paid order's shipment is the end of a customer session: the shipment service emits its
SUCCESS mark. ``update_delivery`` is the external carrier's transaction (UPDATE_DELIVERY).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import String, select, update
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Outbound, Service, Transactional, send, session
from vmsdb_eshop.config import settings
from vmsdb_eshop.events import CheckoutMark, DeliveryNotification, PaymentConfirmed, ShipmentNotification
from vmsdb_eshop.schemas import MarkStatus, PackageStatus, ShipmentStatus
from vmsdb_eshop.services.common import clear, money_column, nested, now, rows, timestamp_column

__all__ = ["Package", "Shipment", "ShipmentRecord"]


class Shipment(Service, name="shipment"):
    @Inbound(PaymentConfirmed)
    @Outbound([ShipmentNotification, CheckoutMark])
    @Transactional
    async def on_payment_confirmed(self, event: PaymentConfirmed) -> None:
        """Ship a paid order: the shipment, one package per item; the session ends here."""
        when = now()
        customer = event.customer
        key = {"customer_id": event.customer_id, "order_id": event.order_id}
        s = session()
        s.add(
            ShipmentRecord(
                **key,
                tid=event.tid,
                package_count=len(event.items),
                total_freight_value=sum((i.freight_value for i in event.items), Decimal(0)),
                request_date=when,
                status=ShipmentStatus.APPROVED,
                first_name=customer.first_name,
                last_name=customer.last_name,
                street=customer.street,
                complement=customer.complement,
                zip_code=customer.zip_code,
                city=customer.city,
                state=customer.state,
            )
        )
        for n, item in enumerate(event.items, start=1):
            s.add(
                Package(
                    **key,
                    package_id=n,
                    seller_id=item.seller_id,
                    product_id=item.product_id,
                    product_name=item.product_name,
                    freight_value=item.freight_value,
                    quantity=item.quantity,
                    shipping_date=when,
                    status=PackageStatus.SHIPPED,
                )
            )
        send(ShipmentNotification(**key, tid=event.tid, status=ShipmentStatus.APPROVED, event_date=when))
        send(CheckoutMark.of(event.tid, event.customer_id, MarkStatus.SUCCESS, "shipment"))

    @Outbound([ShipmentNotification, DeliveryNotification])
    @Transactional
    async def update_delivery(self, tid: str) -> int:
        """UPDATE_DELIVERY: for up to N sellers, deliver the seller's packages of its oldest order.

        Returns the number of packages delivered. Packages are updated in key order, then their
        shipments are locked in key order: concurrent deliveries never deadlock, and the second
        of two that chose the same order finds its packages delivered and skips them.
        """
        when = now()
        oldest = (
            select(Package.seller_id, Package.customer_id, Package.order_id, Package.shipping_date)
            .ext(distinct_on(Package.seller_id))
            .where(Package.status == PackageStatus.SHIPPED)
            .order_by(Package.seller_id, Package.shipping_date, Package.customer_id, Package.order_id)
            .subquery()
        )
        chosen = await rows(
            select(oldest).order_by(oldest.c.shipping_date).limit(settings().delivery_sellers)
        )
        chosen.sort(key=lambda c: (c["customer_id"], c["order_id"], c["seller_id"]))
        delivered = 0
        touched: set[tuple[int, int]] = set()
        for c in chosen:
            packages = await rows(
                update(Package)
                .where(
                    Package.customer_id == c["customer_id"],
                    Package.order_id == c["order_id"],
                    Package.seller_id == c["seller_id"],
                    Package.status == PackageStatus.SHIPPED,
                )
                .values(status=PackageStatus.DELIVERED, delivery_date=when)
                .returning(Package.package_id, Package.seller_id, Package.product_id, Package.product_name)
            )
            for p in packages:
                send(
                    DeliveryNotification(
                        customer_id=c["customer_id"],
                        order_id=c["order_id"],
                        tid=tid,
                        status=PackageStatus.DELIVERED,
                        delivery_date=when,
                        **p,
                    )
                )
            if packages:
                touched.add((c["customer_id"], c["order_id"]))
            delivered += len(packages)
        for customer_id, order_id in sorted(touched):
            await self._progress(customer_id, order_id, tid, when)
        return delivered

    async def _progress(self, customer_id: int, order_id: int, tid: str, when: datetime) -> None:
        """approved -> delivery_in_progress -> concluded, notifying each step."""
        s = session()
        shipment = await s.get(ShipmentRecord, (customer_id, order_id), with_for_update=True)
        if shipment is None:
            return
        # Counted after the lock: a concurrent delivery of this shipment has committed by now.
        left = await rows(
            select(Package.package_id).where(
                Package.customer_id == customer_id,
                Package.order_id == order_id,
                Package.status == PackageStatus.SHIPPED,
            )
        )
        steps = []
        if shipment.status == ShipmentStatus.APPROVED:
            steps.append(ShipmentStatus.DELIVERY_IN_PROGRESS)
        if not left and shipment.status != ShipmentStatus.CONCLUDED:
            steps.append(ShipmentStatus.CONCLUDED)
        for status in steps:
            shipment.status = status
            send(
                ShipmentNotification(
                    customer_id=customer_id, order_id=order_id, tid=tid, status=status, event_date=when
                )
            )

    @Transactional(type="RO", isolation="snapshot")
    async def shipments_of(self, customer_id: int) -> list[dict[str, Any]]:
        """The customer's shipments, each with its packages (one snapshot)."""
        return await nested(
            select(ShipmentRecord.__table__)
            .where(ShipmentRecord.customer_id == customer_id)
            .order_by(ShipmentRecord.order_id),
            select(Package.__table__)
            .where(Package.customer_id == customer_id)
            .order_by(Package.order_id, Package.package_id),
            "packages",
        )

    @Transactional
    async def cleanup(self) -> None:
        await clear(Package, ShipmentRecord)


class ShipmentRecord(Shipment.Model):
    __tablename__ = "shipments"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    tid: Mapped[str] = mapped_column(String(200))
    package_count: Mapped[int]
    total_freight_value: Mapped[Decimal] = money_column()
    request_date: Mapped[datetime] = timestamp_column()
    status: Mapped[str] = mapped_column(String(30))
    first_name: Mapped[str] = mapped_column(default="")
    last_name: Mapped[str] = mapped_column(default="")
    street: Mapped[str] = mapped_column(default="")
    complement: Mapped[str] = mapped_column(default="")
    zip_code: Mapped[str] = mapped_column(default="")
    city: Mapped[str] = mapped_column(default="")
    state: Mapped[str] = mapped_column(default="")


class Package(Shipment.Model):
    __tablename__ = "packages"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    package_id: Mapped[int] = mapped_column(primary_key=True)
    seller_id: Mapped[int] = mapped_column(index=True)
    product_id: Mapped[int]
    product_name: Mapped[str] = mapped_column(default="")
    freight_value: Mapped[Decimal] = money_column()
    quantity: Mapped[int]
    shipping_date: Mapped[datetime] = timestamp_column()
    delivery_date: Mapped[datetime | None] = timestamp_column(nullable=True)
    status: Mapped[str] = mapped_column(String(20))
