"""Payment: charges an invoice; a failed payment ends the checkout as NOT_ACCEPTED.

The sample has no payment provider: a card payment fails when the card has expired by the
invoice date (the workload sends a few such cards), boleto always succeeds. Each payment is one
main line (card or boleto) plus one VOUCHER line per item that carried an incentive.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Outbound, Service, Transactional, send, session
from vmsdb_eshop.events import CheckoutMark, InvoiceIssued, PaymentConfirmed, PaymentFailed
from vmsdb_eshop.schemas import MarkStatus, PaymentType, card_expired
from vmsdb_eshop.services.common import clear, money_column, rows, timestamp_column

__all__ = ["OrderPayment", "Payment", "PaymentCard"]

_CARDS = (PaymentType.CREDIT_CARD, PaymentType.DEBIT_CARD)


class Payment(Service, name="payment"):
    @Inbound(InvoiceIssued)
    @Outbound([PaymentConfirmed, PaymentFailed, CheckoutMark])
    @Transactional
    async def on_invoice(self, event: InvoiceIssued) -> None:
        customer = event.customer
        is_card = customer.payment_type in _CARDS
        ok = not (is_card and card_expired(customer.card_expiration, event.issue_date.date()))
        status = "succeeded" if ok else "failed"
        key = {"customer_id": event.customer_id, "order_id": event.order_id}
        s = session()
        s.add(
            OrderPayment(
                **key,
                sequential=1,
                tid=event.tid,
                type=customer.payment_type,
                installments=customer.installments if is_card else 1,
                value=event.total_invoice,
                status=status,
            )
        )
        if is_card:
            s.add(
                PaymentCard(
                    **key,
                    sequential=1,
                    card_number=customer.card_number,
                    card_holder_name=customer.card_holder_name,
                    card_expiration=customer.card_expiration,
                    card_brand=customer.card_brand,
                )
            )
        vouchers = [i for i in event.items if i.total_incentive > 0]
        for n, item in enumerate(vouchers, start=2):
            s.add(
                OrderPayment(
                    **key,
                    sequential=n,
                    tid=event.tid,
                    type=PaymentType.VOUCHER,
                    installments=1,
                    value=item.total_incentive,
                    status=status,
                )
            )
        total = sum((i.total_amount for i in event.items), Decimal(0))
        common: dict[str, Any] = dict(
            customer_id=event.customer_id,
            tid=event.tid,
            order_id=event.order_id,
            customer=customer,
            total_amount=total,
            items=event.items,
        )
        if ok:
            send(PaymentConfirmed(**common, date=event.issue_date))
            return
        send(PaymentFailed(**common, status="card expired"))
        send(
            CheckoutMark.of(event.tid, event.customer_id, MarkStatus.NOT_ACCEPTED, "payment", "card expired")
        )

    @Transactional(type="RO")
    async def payments_of(self, customer_id: int, order_id: int) -> list[dict[str, Any]]:
        table = OrderPayment.__table__
        return await rows(
            select(table)
            .where(table.c.customer_id == customer_id, table.c.order_id == order_id)
            .order_by(table.c.sequential)
        )

    @Transactional
    async def cleanup(self) -> None:
        await clear(PaymentCard, OrderPayment)


class OrderPayment(Payment.Model):
    __tablename__ = "order_payments"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    sequential: Mapped[int] = mapped_column(primary_key=True)
    tid: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(20))
    installments: Mapped[int]
    value: Mapped[Decimal] = money_column()
    status: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = timestamp_column()


class PaymentCard(Payment.Model):
    __tablename__ = "order_payment_cards"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    sequential: Mapped[int] = mapped_column(primary_key=True)
    card_number: Mapped[str]
    card_holder_name: Mapped[str]
    card_expiration: Mapped[str]
    card_brand: Mapped[str]
