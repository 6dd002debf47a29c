"""The payment: the benchmark's stock moves around an external provider that is called with no
transaction open, declines that release the reservation, and answers recorded exactly once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
import pytest
from sqlalchemy import text

from tests.e2e.conftest import Eshop, assert_holds
from vmsdb_eshop.events import InvoiceIssued
from vmsdb_eshop.payments import _listen
from vmsdb_eshop.provider import Authorization, PaymentRequest, SimulatedProvider
from vmsdb_eshop.services import Payment


@dataclass
class GatedProvider(SimulatedProvider):
    """Holds every call until the test opens the gate; says when a call is waiting."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: asyncio.Event = field(default_factory=asyncio.Event)

    async def authorize(self, request: PaymentRequest) -> Authorization:
        self.waiting.set()
        await self.gate.wait()
        return await super().authorize(request)


@pytest.fixture
def provider() -> GatedProvider:
    return GatedProvider(latency=0)


#: Transactions open in the test's database, other than the one asking.
_OPEN_TRANSACTIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND xact_start IS NOT NULL AND pid <> pg_backend_pid()"
)


async def _no_transaction_open(eshop: Eshop) -> bool:
    """Whether, at one of a few moments, no transaction at all is open in the database (a
    provider called inside the payment's transaction would keep it open at every one)."""
    for _ in range(10):
        async with eshop.app.core.admin() as conn:
            if (await conn.execute(text(_OPEN_TRANSACTIONS))).scalar_one() == 0:
                return True
        await asyncio.sleep(0.02)
    return False


async def _stock(eshop: Eshop, seller: int, product: int) -> tuple[int, int, int, int]:
    s = await eshop.get(f"/stock/{seller}/{product}")
    return s["qty_available"], s["qty_reserved"], s["qty_free"], s["order_count"]


@pytest.mark.parametrize("approved", [True, False], ids=["confirmed", "declined"])
async def test_reservation_then_payment_outside_any_transaction(
    eshop: Eshop, provider: GatedProvider, approved: bool
) -> None:
    provider.failure_rate = 0.0 if approved else 1.0
    await eshop.add(4, 2, 2, 3)
    assert await _stock(eshop, 2, 2) == (100, 0, 100, 0)  # the lease holds 3; qty_free stays
    checkout = asyncio.create_task(eshop.checkout(4, "t-gated"))
    await asyncio.wait_for(provider.waiting.wait(), 30)

    # Reserved, as the benchmark reserves: qty_reserved += q, qty_available untouched.
    assert await _stock(eshop, 2, 2) == (100, 3, 97, 0)
    # The provider is being called, and no transaction is open while it is.
    assert await _no_transaction_open(eshop)
    assert not checkout.done()

    provider.gate.set()
    response = await checkout
    await eshop.app.drain()
    (order,) = await eshop.get("/order/4")
    customer = await eshop.get("/customer/4")
    if approved:
        assert response.status_code == 200, response.text
        assert await _stock(eshop, 2, 2) == (97, 0, 97, 1)  # sold: available and reserved drop
        assert (order["status"], customer["success_payment_count"]) == ("READY_FOR_SHIPMENT", 1)
    else:
        assert response.status_code == 409
        assert (response.json()["source"], response.json()["reason"]) == (
            "payment",
            "declined by the provider",
        )
        assert await _stock(eshop, 2, 2) == (100, 0, 100, 0)  # the reservation is released
        assert (order["status"], customer["failed_payment_count"]) == ("PAYMENT_FAILED", 1)
        assert await eshop.get("/shipment/4") == []
    assert_holds(await eshop.verdict())


async def test_an_answer_is_recorded_once(eshop: Eshop, provider: GatedProvider) -> None:
    """A second answer for the same request (a retry after a crash, a second processor)
    changes nothing: no second payment line, no second PaymentConfirmed."""
    provider.gate.set()
    await eshop.add(5, 3, 3, 1)
    assert (await eshop.checkout(5, "t-once")).status_code == 200
    await eshop.app.drain()
    async with eshop.app.core.admin() as conn:
        row = (
            await conn.execute(text("SELECT invoice FROM payment.payment_requests WHERE tid = 't-once'"))
        ).scalar_one()
    invoice = InvoiceIssued.model_validate(row)
    payment = eshop.app.service(Payment)
    assert await payment.settle(invoice, True) is False
    assert await payment.settle(invoice, False, "late decline") is False
    await eshop.app.drain()
    lines = await payment.payments_of(5, invoice.order_id)
    assert [(p["sequential"], p["status"]) for p in lines if p["type"] != "VOUCHER"] == [(1, "succeeded")]
    assert {p["status"] for p in lines} == {"succeeded"}  # voucher lines (if any) once too
    assert provider.charges == {f"5/{invoice.order_id}": 1}
    assert (await eshop.get("/customer/5"))["success_payment_count"] == 1
    assert_holds(await eshop.verdict())


async def test_a_recorded_request_wakes_the_processors(eshop: Eshop, provider: GatedProvider) -> None:
    """The request's transaction notifies the processors' channel when it commits (they would
    otherwise find it only when they next look)."""
    provider.gate.set()
    woken = asyncio.Event()
    listener = await _listen(eshop.app, woken)
    try:
        await eshop.add(6, 1, 1, 1)
        assert (await eshop.checkout(6, "t-wake")).status_code == 200
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        await listener.close()


async def test_a_processor_stopped_while_it_starts_listening_leaves_no_connection_open(
    eshop: Eshop, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[asyncpg.Connection] = []
    listening = asyncio.Event()

    async def stuck(self: asyncpg.Connection, *_: object) -> None:  # LISTEN never answers
        opened.append(self)
        listening.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(asyncpg.Connection, "add_listener", stuck)
    task = asyncio.create_task(_listen(eshop.app, asyncio.Event()))
    await asyncio.wait_for(listening.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [conn.is_closed() for conn in opened] == [True]
