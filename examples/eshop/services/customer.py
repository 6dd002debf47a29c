"""Customer: customers, their payment and delivery counters, and their seller discounts.

Customers are ``referenceable``: each order holds a reference to its customer (G9), with a
cached copy of the name and city that a restore of this service can recover from (G10).

``CustomerRecord`` and ``CustomerDiscount`` are exported (read-only) so that the order service's
``@Query`` can check a customer's discounts in the order's own transaction; ``expired()`` is an
SQL function the customer service offers to such queries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Update, bindparam, update
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Service, Transactional, connection, session, sql_function
from vmsdb_eshop.events import DeliveryNotification, PaymentConfirmed, PaymentFailed
from vmsdb_eshop.schemas import CustomerRow, DiscountRow
from vmsdb_eshop.services.common import OWN_KEY_GROUP, as_row, upsert

__all__ = ["Customer", "CustomerDiscount", "CustomerRecord"]


class Customer(Service, name="customer"):
    @Transactional
    async def ingest(self, customers: list[CustomerRow]) -> int:
        await upsert(CustomerRecord, [c.model_dump() for c in customers])
        return len(customers)

    @Transactional
    async def add_discounts(self, discounts: list[DiscountRow]) -> int:
        await upsert(CustomerDiscount, [d.model_dump() for d in discounts])
        return len(discounts)

    @Transactional(type="RO")
    async def get(self, customer_id: int) -> dict[str, Any] | None:
        row = await session().get(CustomerRecord, customer_id)
        return None if row is None else as_row(row)

    @Inbound(PaymentConfirmed, group_commit=OWN_KEY_GROUP)
    @Transactional
    async def on_payment_confirmed(self, event: PaymentConfirmed) -> None:
        await connection().execute(_COUNT["success_payment_count"], {"by_customer": event.customer_id})

    @Inbound(PaymentFailed, group_commit=OWN_KEY_GROUP)
    @Transactional
    async def on_payment_failed(self, event: PaymentFailed) -> None:
        await connection().execute(_COUNT["failed_payment_count"], {"by_customer": event.customer_id})

    @Inbound(DeliveryNotification, group_commit=OWN_KEY_GROUP)
    @Transactional
    async def on_delivery(self, event: DeliveryNotification) -> None:
        await connection().execute(_COUNT["delivery_count"], {"by_customer": event.customer_id})

    @Transactional
    async def cleanup(self) -> None:
        """Zero every counter (the discounts stay)."""
        await session().execute(
            update(CustomerRecord).values(success_payment_count=0, failed_payment_count=0, delivery_count=0)
        )


@Customer.export
@Customer.referenceable
class CustomerRecord(Customer.Model):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    first_name: Mapped[str]
    last_name: Mapped[str]
    address: Mapped[str] = mapped_column(default="")
    complement: Mapped[str] = mapped_column(default="")
    birth_date: Mapped[str] = mapped_column(default="")
    zip_code: Mapped[str] = mapped_column(default="")
    city: Mapped[str] = mapped_column(default="")
    state: Mapped[str] = mapped_column(default="")
    card_number: Mapped[str] = mapped_column(default="")
    card_security_number: Mapped[str] = mapped_column(default="")
    card_expiration: Mapped[str] = mapped_column(default="")
    card_holder_name: Mapped[str] = mapped_column(default="")
    card_type: Mapped[str] = mapped_column(default="")
    success_payment_count: Mapped[int] = mapped_column(default=0)
    failed_payment_count: Mapped[int] = mapped_column(default=0)
    delivery_count: Mapped[int] = mapped_column(default=0)
    data: Mapped[str] = mapped_column(default="")


@Customer.export
class CustomerDiscount(Customer.Model):
    """A customer's loyalty discount (percent) on one seller's items, until ``expires_at``."""

    __tablename__ = "customer_discounts"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    seller_id: Mapped[int] = mapped_column(primary_key=True)
    percent: Mapped[int]
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    expired = sql_function("self.expires_at <= now()")


def _counting(counter: str) -> Update:
    column = CustomerRecord.__table__.c[counter]
    return (
        update(CustomerRecord)
        .where(CustomerRecord.id == bindparam("by_customer"))
        .values({column: column + 1})
    )


#: ``counter += 1`` of one customer, per counter: built once (the fast path for a hot handler,
#: README "Performance"), run with ``{"by_customer": id}``.
_COUNT = {
    counter: _counting(counter)
    for counter in ("success_payment_count", "failed_payment_count", "delivery_count")
}
