"""Payment: charges an invoice through the external provider, in two transactions.

1. ``on_invoice`` (the InvoiceIssued handler) records a pending ``payment_requests`` row and
   commits; nothing is charged inside a transaction.
2. ``claim`` marks a few pending requests as being worked on (so that processors in other
   processes leave them alone for a while) and returns them; the processor
   (``vmsdb_eshop.payments``) then calls the provider outside any transaction, with the
   request's key (customer/order) as the idempotency key.
3. ``settle`` records the answer: payment lines, PaymentConfirmed or PaymentFailed, only if the
   request is still pending. A second answer for the same request (a retry after a crash, a
   second processor) changes nothing, so the effects happen exactly once.

Each payment is one main line (card or boleto) plus one VOUCHER line per item that carried an
incentive.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Insert, Select, String, Update, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from framework import Inbound, Outbound, Service, Transactional, connection, send, session, trace_context
from vmsdb_eshop.events import CheckoutMark, InvoiceIssued, PaymentConfirmed, PaymentFailed
from vmsdb_eshop.schemas import MarkStatus, PaymentType
from vmsdb_eshop.services.common import (
    OWN_KEY_GROUP,
    RowsInsert,
    clear,
    money_column,
    now,
    rows,
    timestamp_column,
)

__all__ = ["REQUESTS_CHANNEL", "OrderPayment", "Payment", "PaymentCard", "PaymentRequestRecord"]

_CARDS = (PaymentType.CREDIT_CARD, PaymentType.DEBIT_CARD)
#: How long a claimed request is left to its processor before another one may take it.
CLAIM_PERIOD = timedelta(seconds=5)
#: Notified when a request commits (a NOTIFY is delivered at commit, never before).
REQUESTS_CHANNEL = "eshop_payment_requests"


class Payment(Service, name="payment"):
    @Inbound(InvoiceIssued, group_commit=OWN_KEY_GROUP)
    @Transactional
    async def on_invoice(self, event: InvoiceIssued) -> None:
        """Record the charge to make; the processor makes it after this commits.

        One statement: the request's INSERT, and ``pg_notify`` (delivered at commit) after it.
        """
        await connection().execute(
            _REQUEST,
            {
                "customer": event.customer_id,
                "order": event.order_id,
                "tid": event.tid,
                "invoice": event.model_dump(mode="json"),
                # The processor charges outside this transaction: it continues this trace.
                "trace_context": trace_context(),
            },
        )

    @Transactional
    async def claim(self, limit: int = 16) -> list[tuple[InvoiceIssued, str | None]]:
        """Take up to ``limit`` pending requests nobody works on, for ``CLAIM_PERIOD``: each
        invoice with the trace context of the handler that recorded it."""
        taken = await rows(_CLAIM, {"limit": limit})
        return [(InvoiceIssued.model_validate(r["invoice"]), r["trace_context"]) for r in taken]

    @Transactional(type="RO")
    async def pending(self) -> int:
        """How many requests still wait for the provider's answer."""
        count = await session().scalar(
            select(func.count())
            .select_from(PaymentRequestRecord)
            .where(PaymentRequestRecord.status == "pending")
        )
        return int(count or 0)

    @Outbound([PaymentConfirmed, PaymentFailed, CheckoutMark])
    @Transactional
    async def settle(self, event: InvoiceIssued, approved: bool, reason: str = "") -> bool:
        """Record the provider's answer for ``event``'s request; ``False`` if it was settled."""
        status = "succeeded" if approved else "failed"
        answer = {
            "by_customer": event.customer_id,
            "by_order": event.order_id,
            "status": status,
            "reason": reason,
        }
        settled = (await connection().execute(_SETTLE, {**answer, "at": now()})).first()
        if settled is None:
            return False
        await self._record(event, status)
        total = sum((i.total_amount for i in event.items), Decimal(0))
        common: dict[str, Any] = dict(
            customer_id=event.customer_id,
            tid=event.tid,
            order_id=event.order_id,
            customer=event.customer,
            total_amount=total,
            items=event.items,
        )
        if approved:
            send(PaymentConfirmed(**common, date=event.issue_date))
            return True
        send(PaymentFailed(**common, status=reason))
        send(CheckoutMark.of(event.tid, event.customer_id, MarkStatus.NOT_ACCEPTED, "payment", reason))
        return True

    async def _record(self, event: InvoiceIssued, status: str) -> None:
        """The payment lines and the card, in one statement (the card's INSERT as a CTE)."""
        customer = event.customer
        is_card = customer.payment_type in _CARDS
        key = {"customer_id": event.customer_id, "order_id": event.order_id}
        line = {**key, "tid": event.tid, "status": status}
        main = {
            **line,
            "sequential": 1,
            "type": customer.payment_type,
            "installments": customer.installments if is_card else 1,
            "value": event.total_invoice,
        }
        vouchers = [i for i in event.items if i.total_incentive > 0]
        lines = [
            main,
            *(
                {
                    **line,
                    "sequential": n,
                    "type": PaymentType.VOUCHER,
                    "installments": 1,
                    "value": item.total_incentive,
                }
                for n, item in enumerate(vouchers, start=2)
            ),
        ]
        params = _LINES.params(lines)
        if not is_card:
            await connection().execute(_LINES.statement, params)
            return
        card = {name: getattr(customer, name) for name in _CARD_COLUMNS}
        await connection().execute(
            _LINES_AND_CARD,
            {**params, **card, "card_customer": event.customer_id, "card_order": event.order_id},
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
        await clear(PaymentCard, OrderPayment, PaymentRequestRecord)


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


class PaymentRequestRecord(Payment.Model):
    """A charge to make: pending until the provider's answer is recorded (exactly once)."""

    __tablename__ = "payment_requests"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    tid: Mapped[str] = mapped_column(String(200))
    invoice: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str] = mapped_column(default="")
    claimed_until: Mapped[datetime] = timestamp_column()
    created_at: Mapped[datetime] = timestamp_column()
    settled_at: Mapped[datetime | None] = timestamp_column(nullable=True)
    #: The W3C traceparent of the recording handler, when tracing is on.
    trace_context: Mapped[str | None] = mapped_column(String(55), nullable=True)


# -- the hot statements, built once (see the cart's) -------------------------------------------


def _request() -> Select[Any]:
    """The request's INSERT, and ``pg_notify`` (delivered at commit) after it."""
    request = insert(PaymentRequestRecord.__table__).values(
        customer_id=bindparam("customer"),
        order_id=bindparam("order"),
        tid=bindparam("tid"),
        invoice=bindparam("invoice"),
        status="pending",
        trace_context=bindparam("trace_context"),
    )
    return select(func.pg_notify(REQUESTS_CHANNEL, "")).add_cte(request.cte("request"))


_REQUEST = _request()


def _claim() -> Update:
    table = PaymentRequestRecord.__table__
    free = (
        select(table.c.customer_id, table.c.order_id)
        .where(table.c.status == "pending", table.c.claimed_until <= func.now())
        .order_by(table.c.created_at)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)  # concurrent processors take different requests
        .cte()
    )
    return (
        update(table)
        .where(table.c.customer_id == free.c.customer_id, table.c.order_id == free.c.order_id)
        .values(claimed_until=func.now() + CLAIM_PERIOD)
        .returning(table.c.invoice, table.c.trace_context)
    )


_CLAIM = _claim()

_SETTLE = (
    update(PaymentRequestRecord)
    .where(
        PaymentRequestRecord.customer_id == bindparam("by_customer"),
        PaymentRequestRecord.order_id == bindparam("by_order"),
        PaymentRequestRecord.status == "pending",  # the answer takes effect once
    )
    .values(status=bindparam("status"), reason=bindparam("reason"), settled_at=bindparam("at"))
    .returning(PaymentRequestRecord.order_id)
)

_LINES = RowsInsert(
    OrderPayment, ["customer_id", "order_id", "tid", "status", "sequential", "type", "installments", "value"]
)


_CARD_COLUMNS = ("card_number", "card_holder_name", "card_expiration", "card_brand")


def _lines_and_card() -> Insert:
    """The payment lines with the card's INSERT as a CTE (its customer and order as
    ``card_customer`` and ``card_order``)."""
    card = insert(PaymentCard.__table__).values(
        {
            "customer_id": bindparam("card_customer"),
            "order_id": bindparam("card_order"),
            "sequential": 1,
            **{name: bindparam(name) for name in _CARD_COLUMNS},
        }
    )
    return _LINES.statement.add_cte(card.cte("card"))


_LINES_AND_CARD = _lines_and_card()
