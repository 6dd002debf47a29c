"""Shipment: one shipment per paid order, one package per item, and the carrier's deliveries.

A paid order's shipment is the end of a customer session: the shipment service emits its
SUCCESS mark. ``update_delivery`` is the external carrier's transaction (UPDATE_DELIVERY).

Every handler here does set-based work: one statement writes all of an order's packages, and a
delivery takes three statements whatever the number of sellers, packages and shipments it touches.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Insert,
    String,
    Update,
    and_,
    bindparam,
    case,
    exists,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Outbound, Service, Transactional, connection, send
from vmsdb_eshop.config import settings
from vmsdb_eshop.events import CheckoutMark, DeliveryNotification, PaymentConfirmed, ShipmentNotification
from vmsdb_eshop.schemas import MarkStatus, PackageStatus, ShipmentStatus
from vmsdb_eshop.services.common import (
    OWN_KEY_GROUP,
    RowsInsert,
    clear,
    keys_in,
    money_column,
    nested,
    now,
    rows,
    timestamp_column,
)

__all__ = ["Package", "Shipment", "ShipmentRecord"]


class Shipment(Service, name="shipment"):
    @Inbound(PaymentConfirmed, group_commit=OWN_KEY_GROUP)
    @Outbound([ShipmentNotification, CheckoutMark])
    @Transactional
    async def on_payment_confirmed(self, event: PaymentConfirmed) -> None:
        """Ship a paid order: the shipment, one package per item; the session ends here.

        One statement: the shipment's INSERT rides along as a CTE of the packages' INSERT.
        """
        when = now()
        customer = event.customer
        key = {"customer_id": event.customer_id, "order_id": event.order_id}
        shipment = {
            "customer": event.customer_id,
            "order": event.order_id,
            "tid": event.tid,
            "package_count": len(event.items),
            "total_freight_value": sum((i.freight_value for i in event.items), Decimal(0)),
            "request_date": when,
            **{name: getattr(customer, name) for name in _ADDRESS},
        }
        packages = [
            {
                **key,
                "package_id": n,
                "seller_id": item.seller_id,
                "product_id": item.product_id,
                "product_name": item.product_name,
                "freight_value": item.freight_value,
                "quantity": item.quantity,
                "shipping_date": when,
                "status": PackageStatus.SHIPPED,
            }
            for n, item in enumerate(event.items, start=1)
        ]
        await connection().execute(_SHIP, {**shipment, **_PACKAGES.params(packages)})
        send(ShipmentNotification(**key, tid=event.tid, status=ShipmentStatus.APPROVED, event_date=when))
        send(CheckoutMark.of(event.tid, event.customer_id, MarkStatus.SUCCESS, "shipment"))

    @Outbound([ShipmentNotification, DeliveryNotification])
    @Transactional
    async def update_delivery(self, tid: str) -> int:
        """UPDATE_DELIVERY: for up to N sellers, deliver the seller's packages of its oldest order.

        Returns the number of packages delivered. Concurrent deliveries never wait for each
        other's packages (see ``_deliver``) and never deadlock: the only locks they wait for are
        their shipments', which every delivery takes in key order.
        """
        when = now()
        delivered = await rows(_DELIVER, {"sellers": settings().delivery_sellers, "at": when})
        delivered.sort(key=lambda p: (p["customer_id"], p["order_id"], p["seller_id"], p["package_id"]))
        for package in delivered:
            send(DeliveryNotification(tid=tid, status=PackageStatus.DELIVERED, delivery_date=when, **package))
        if delivered:
            touched = sorted({(p["customer_id"], p["order_id"]) for p in delivered})
            await self._progress(touched, tid, when)
        return len(delivered)

    async def _progress(self, shipments: Sequence[tuple[int, int]], tid: str, when: datetime) -> None:
        """approved -> delivery_in_progress -> concluded, notifying each step (``shipments``:
        ``(customer_id, order_id)`` in key order)."""
        keys = {"customer_id_list": [c for c, _ in shipments], "order_id_list": [o for _, o in shipments]}
        # Lock the shipments in key order and read their status as locked. A concurrent delivery
        # of the same shipments (another seller's packages of the same order) waits here until
        # this transaction commits, or this one waits for it.
        locked = await rows(_LOCK_SHIPMENTS, keys)
        was = {(r["customer_id"], r["order_id"]): r["status"] for r in locked}
        # The packages left are counted in a later statement than the lock (_ADVANCE): under
        # read committed a statement reads the snapshot taken when it began, before it waited
        # for the lock. This one begins after every delivery that locked these shipments before
        # us has committed, so it sees their packages delivered, and the last of two deliveries
        # of one order's packages concludes the shipment.
        advanced = await rows(_ADVANCE, keys)
        status = {(r["customer_id"], r["order_id"]): r["status"] for r in advanced}
        for customer_id, order_id in shipments:
            if (customer_id, order_id) not in status:
                continue
            steps = []
            if was[customer_id, order_id] == ShipmentStatus.APPROVED:
                steps.append(ShipmentStatus.DELIVERY_IN_PROGRESS)
            if status[customer_id, order_id] == ShipmentStatus.CONCLUDED:
                steps.append(ShipmentStatus.CONCLUDED)
            for step in steps:
                send(
                    ShipmentNotification(
                        customer_id=customer_id, order_id=order_id, tid=tid, status=step, event_date=when
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


def _deliver() -> Update:
    """Deliver the shipped packages of each of up to ``:sellers`` sellers' oldest order (by
    shipping date), at ``:at``, in one statement that returns the packages it delivered.

    The packages are locked ``SKIP LOCKED``: a delivery never waits for another one's packages.
    When two deliveries choose the same order, the second leaves the packages the first holds
    to it, as it would have after waiting: the first delivers them. (Without SKIP LOCKED every
    concurrent delivery queues behind the one holding the oldest orders, only to find them
    delivered.) A package another delivery has just delivered and committed is no longer
    ``shipped`` when locked, and is left out too: no package is delivered twice.
    """
    shipped = Package.status == PackageStatus.SHIPPED
    oldest = (
        select(Package.seller_id, Package.customer_id, Package.order_id, Package.shipping_date)
        .ext(distinct_on(Package.seller_id))
        .where(shipped)
        .order_by(Package.seller_id, Package.shipping_date, Package.customer_id, Package.order_id)
        .subquery("oldest")
    )
    chosen = select(oldest).order_by(oldest.c.shipping_date).limit(bindparam("sellers")).subquery("chosen")
    free = (
        select(Package.customer_id, Package.order_id, Package.package_id)
        .join(
            chosen,
            and_(
                Package.customer_id == chosen.c.customer_id,
                Package.order_id == chosen.c.order_id,
                Package.seller_id == chosen.c.seller_id,
            ),
        )
        .where(shipped)
        .with_for_update(of=Package, skip_locked=True)
        .cte("free")
    )
    return (
        update(Package)
        .where(
            Package.customer_id == free.c.customer_id,
            Package.order_id == free.c.order_id,
            Package.package_id == free.c.package_id,
        )
        .values(status=PackageStatus.DELIVERED, delivery_date=bindparam("at"))
        .returning(
            Package.customer_id,
            Package.order_id,
            Package.package_id,
            Package.seller_id,
            Package.product_id,
            Package.product_name,
        )
    )


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


# -- a delivery's statements, built once (see the cart's) ------------------------------------

_DELIVER = _deliver()


_LOCK_SHIPMENTS = (
    select(ShipmentRecord.customer_id, ShipmentRecord.order_id, ShipmentRecord.status)
    .where(keys_in(ShipmentRecord.customer_id, ShipmentRecord.order_id))
    .order_by(ShipmentRecord.customer_id, ShipmentRecord.order_id)
    .with_for_update()
)


def _advance() -> Update:
    """approved -> delivery_in_progress, or -> concluded once no package is left shipped."""
    left = exists().where(
        Package.customer_id == ShipmentRecord.customer_id,
        Package.order_id == ShipmentRecord.order_id,
        Package.status == PackageStatus.SHIPPED,
    )
    return (
        update(ShipmentRecord)
        .where(
            keys_in(ShipmentRecord.customer_id, ShipmentRecord.order_id),
            ShipmentRecord.status != ShipmentStatus.CONCLUDED,
            or_(ShipmentRecord.status == ShipmentStatus.APPROVED, ~left),
        )
        .values(status=case((left, ShipmentStatus.DELIVERY_IN_PROGRESS), else_=ShipmentStatus.CONCLUDED))
        .returning(ShipmentRecord.customer_id, ShipmentRecord.order_id, ShipmentRecord.status)
    )


_ADVANCE = _advance()


# -- a paid order's shipment, built once (see the cart's) --------------------------------------

#: What a shipment copies of the customer's checkout.
_ADDRESS = ("first_name", "last_name", "street", "complement", "zip_code", "city", "state")

_PACKAGES = RowsInsert(
    Package,
    [
        "customer_id",
        "order_id",
        "package_id",
        "seller_id",
        "product_id",
        "product_name",
        "freight_value",
        "quantity",
        "shipping_date",
        "status",
    ],
)


def _ship() -> Insert:
    """The packages' INSERT (``_PACKAGES``), the shipment's riding along as a CTE."""
    shipment = insert(ShipmentRecord).values(
        customer_id=bindparam("customer"),
        order_id=bindparam("order"),
        status=ShipmentStatus.APPROVED,
        **{
            name: bindparam(name)
            for name in ("tid", "package_count", "total_freight_value", "request_date", *_ADDRESS)
        },
    )
    return _PACKAGES.statement.add_cte(shipment.cte("shipment"))


_SHIP = _ship()
