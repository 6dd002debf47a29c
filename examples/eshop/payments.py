"""The payment processor: the provider call between the payment service's two transactions.

```
InvoiceIssued --on_invoice (tx 1: pending request)--> claim (tx) --> provider.authorize(key)
    (no transaction open) --> settle (tx 2: payment lines + PaymentConfirmed/Failed, once)
```

The processor runs beside the App (``create_api``'s lifespan starts one); several processes
may each run one. A crash after the provider answered and before ``settle`` committed leaves
the request pending: it is claimed again once its claim lapses, the provider answers the same
key with the same answer (and charges once), and ``settle`` records it. ``settle`` of a request
that is no longer pending does nothing, so a second processor's answer has no effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg

from framework import App, continue_trace, correlate
from vmsdb_eshop.events import InvoiceIssued
from vmsdb_eshop.provider import PaymentProvider, PaymentRequest, SimulatedProvider
from vmsdb_eshop.services import Payment
from vmsdb_eshop.services.payment import REQUESTS_CHANNEL

__all__ = ["payment_processor", "process_payments", "settle_all"]

log = logging.getLogger("vmsdb.eshop.payments")

#: How long an idle processor waits for a notification before it looks for requests anyway
#: (requests of a processor that crashed, notifications missed while it was reconnecting).
IDLE_POLL = 0.2


def request_of(invoice: InvoiceIssued) -> PaymentRequest:
    """The provider request for an invoice, keyed by customer and order (its idempotency key)."""
    customer = invoice.customer
    return PaymentRequest(
        key=f"{invoice.customer_id}/{invoice.order_id}",
        amount=invoice.total_invoice,
        payment_type=customer.payment_type,
        card_expiration=customer.card_expiration,
        on=invoice.issue_date.date(),
    )


async def _charge(
    payment: Payment, provider: PaymentProvider, invoice: InvoiceIssued, trace: str | None
) -> None:
    # The chain's later events and marks carry the checkout's tid, and stay in its trace.
    with continue_trace(trace), correlate(invoice.tid):
        answer = await provider.authorize(request_of(invoice))  # outside any transaction
        await payment.settle(invoice, answer.approved, answer.reason)


async def _listen(app: App, wake: asyncio.Event) -> asyncpg.Connection:
    """A connection that sets ``wake`` whenever a payment request commits."""
    engine = app.core.engine
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    conn: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
    try:
        await conn.add_listener(REQUESTS_CHANNEL, lambda *_: wake.set())
    except BaseException:  # cancelled (the App stopping) while it listened: not left open
        await conn.close()
        raise
    return conn


async def process_payments(app: App, provider: PaymentProvider, *, idle: float = IDLE_POLL) -> None:
    """Claim pending requests, charge them, record the answers; runs until cancelled.

    Woken by the notification each committed request sends; without one it looks every
    ``idle`` seconds.
    """
    payment = app.service(Payment)
    wake = asyncio.Event()
    listener = await _listen(app, wake)
    try:
        await _serve(payment, provider, wake, idle)
    finally:
        await listener.close()


async def _serve(payment: Payment, provider: PaymentProvider, wake: asyncio.Event, idle: float) -> None:
    while True:
        wake.clear()  # before the claim: a request committed after it wakes the wait below
        try:
            claimed = await payment.claim()
        except Exception:  # a failed claim (database restart, ...) is retried, not fatal
            log.exception("claiming payment requests failed")
            claimed = []
        if not claimed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), idle)
            continue
        results = await asyncio.gather(
            *(_charge(payment, provider, invoice, trace) for invoice, trace in claimed),
            return_exceptions=True,
        )
        for (invoice, _), result in zip(claimed, results, strict=True):
            if isinstance(result, BaseException):  # left pending: claimed again when the claim lapses
                log.warning(
                    "payment of order %s/%s failed: %r", invoice.customer_id, invoice.order_id, result
                )


@contextlib.asynccontextmanager
async def payment_processor(app: App, provider: PaymentProvider | None = None) -> AsyncIterator[None]:
    """Run a processor for ``app`` (default provider: simulated, no failures) while inside."""
    task = asyncio.create_task(process_payments(app, provider or SimulatedProvider()))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle_all(app: App, timeout: float = 120.0) -> None:
    """Wait until every event is handled and no payment waits for the provider.

    A processor must be running. Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    payment = app.service(Payment)
    while True:
        await app.drain(timeout=max(0.1, deadline - time.monotonic()))
        if await payment.pending() == 0:
            await app.drain(timeout=max(0.1, deadline - time.monotonic()))
            if await payment.pending() == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"payments still pending after {timeout} s")
        await asyncio.sleep(0.01)
