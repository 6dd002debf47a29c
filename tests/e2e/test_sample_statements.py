"""The stock's and the cart's statements, pinned: set-based, so a checkout of five items costs
them what a checkout of one does. No timings; a count that grows is paid on every checkout.
And every statement of a checkout is SQLAlchemy's compiled cache's: none is compiled again
because the checkout has another number of items.

Each statement SQLAlchemy sends is counted against the service function whose transaction sent
it (a lease call counts for its caller). The framework's own statements (BEGIN, the outbox with
the acknowledgement and COMMIT) are not counted: tests/integration/test_statement_counts.py pins
those.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExecutionContext
from sqlalchemy.engine.default import CACHE_MISS, NO_CACHE_KEY
from sqlalchemy.sql.expression import ReleaseSavepointClause, RollbackToSavepointClause, SavepointClause

from framework._internal.context import current
from framework.testing import advance_clock
from tests.e2e.conftest import Eshop, assert_holds
from vmsdb_eshop.config import settings
from vmsdb_eshop.payments import settle_all
from vmsdb_eshop.services.payment import Payment

# Today's counts; lower them when a change saves a statement, never raise them. Before the
# set-based rewrite a checkout of n items cost the cart 2 + 5 (claim, checkout), the stock's
# reservation 5n (and 2n savepoints) and its confirmation 1 + n; an add 4, a re-add 6 (and 2
# savepoints).
CHECKOUT = {"Cart.start_checkout": 1, "Cart.checkout": 2, "Stock.reserve": 3, "Stock.confirm": 1}
# An add, all its calls: whether the customer and the product exist (one query, in the cart's
# transaction; before, two more calls of their own), the cart's upsert, the replaced line's
# lease, the stock's hold, the line's upsert.
ADD = 5
READD = ADD + 1  # and the replaced lease given back
# Items whose cart lease expired: a lease on the spot for each, and one consume for them all.
SPOT = 1
SPOT_CONSUME = 1


@contextmanager
def statements_by_function() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()

    def note(*_: Any) -> None:
        ctx = current()
        if ctx is not None:
            counts[ctx.function] += 1

    event.listen(Engine, "before_cursor_execute", note)
    try:
        yield counts
    finally:
        event.remove(Engine, "before_cursor_execute", note)


_SAVEPOINTS = (SavepointClause, ReleaseSavepointClause, RollbackToSavepointClause)


@contextmanager
def compiled_again() -> Iterator[list[str]]:
    """Statements of service functions that SQLAlchemy compiled, not found in its cache: ``NO_CACHE_KEY``
    (it cannot cache them, e.g. an INSERT of several VALUES rows) or ``CACHE_MISS`` (not seen yet).
    Left out: statements SQLAlchemy did not compile (driver SQL: nothing to cache) and its own
    SAVEPOINT statements (of ``begin_nested``; never cached, and no service writes them)."""
    found: list[str] = []

    def note(*args: Any) -> None:
        context: ExecutionContext | None = args[4]  # (conn, cursor, statement, parameters, context, ...)
        ctx = current()
        compiled = getattr(context, "compiled", None)
        if ctx is None or compiled is None or isinstance(compiled.statement, _SAVEPOINTS):
            return
        hit = getattr(context, "cache_hit", None)
        if hit in (NO_CACHE_KEY, CACHE_MISS):
            found.append(f"{ctx.function} {hit.name}: {' '.join(str(args[2]).split())[:100]}")

    event.listen(Engine, "before_cursor_execute", note)
    try:
        yield found
    finally:
        event.remove(Engine, "before_cursor_execute", note)


async def checkout(eshop: Eshop, customer: int, tid: str) -> Counter[str]:
    with statements_by_function() as counts:
        response = await eshop.checkout(customer, tid)
        assert response.status_code == 200, response.text
        await eshop.app.drain()
    return counts


async def test_a_checkout_costs_the_same_for_one_item_as_for_five(eshop: Eshop) -> None:
    await eshop.add(1, 1, 1, 1)
    one = await checkout(eshop, 1, "t-one")
    for seller, product in [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2)]:
        await eshop.add(2, seller, product, 2)
    five = await checkout(eshop, 2, "t-five")
    assert {f: one[f] for f in CHECKOUT} == CHECKOUT, one
    assert {f: five[f] for f in CHECKOUT} == CHECKOUT, five
    assert_holds(await eshop.verdict())


async def test_an_add_to_the_cart_is_one_call_of_five_statements(eshop: Eshop) -> None:
    with statements_by_function() as first:
        await eshop.add(3, 1, 1, 1)
    with statements_by_function() as again:
        await eshop.add(3, 1, 1, 2)  # replaces the line and its lease
    assert (dict(first), dict(again)) == ({"Cart.add_item": ADD}, {"Cart.add_item": READD})


async def test_an_add_of_an_unknown_customer_or_product_is_404_naming_it_and_writes_nothing(
    eshop: Eshop,
) -> None:
    item = {"SellerId": 1, "ProductId": 1, "ProductName": "p", "UnitPrice": "1.00", "Quantity": 1}
    unknown_customer = await eshop.http.patch("/cart/999999/add", json=item)
    assert unknown_customer.status_code == 404, unknown_customer.text
    assert "customer 999999 does not exist" in unknown_customer.text
    unknown_product = await eshop.http.patch("/cart/3/add", json={**item, "ProductId": 999999})
    assert unknown_product.status_code == 404, unknown_product.text
    assert "product 1/999999 does not exist" in unknown_product.text
    for customer in (999999, 3):  # checked before the cart's upsert: no cart row was written
        assert (await eshop.http.get(f"/cart/{customer}")).status_code == 404


async def test_expired_leases_cost_the_reservation_a_statement_each_and_one(eshop: Eshop) -> None:
    for product in (1, 2, 3):
        await eshop.add(4, 2, product, 1)
    await advance_clock(eshop.app, timedelta(seconds=settings().lease_seconds + 60))
    await eshop.add(4, 3, 1, 1)  # the one lease still running
    counts = await checkout(eshop, 4, "t-expired")
    assert counts["Stock.reserve"] == CHECKOUT["Stock.reserve"] + 3 * SPOT + SPOT_CONSUME, counts
    assert_holds(await eshop.verdict())


async def test_a_failed_payment_costs_the_stock_one_statement(eshop: Eshop) -> None:
    for product in (1, 2, 3):
        await eshop.add(5, 1, product, 1)
    with statements_by_function() as counts:
        assert (await eshop.checkout(5, "t-declined", expired_card=True)).status_code == 409
        await eshop.app.drain()
    assert counts["Stock.cancel"] == 1, counts
    assert_holds(await eshop.verdict())


async def test_a_checkout_of_another_item_count_compiles_no_statement_again(eshop: Eshop) -> None:
    """After a checkout of two items (one with a voucher), one of four items (two with vouchers)
    runs on cached statements only: an INSERT of n rows has one text whatever n."""
    for seller, product in [(1, 1), (2, 2)]:
        await eshop.add(6, seller, product, 1, voucher="0.50" if seller == 1 else "0")
    await checkout(eshop, 6, "t-warm")
    for seller, product in [(1, 2), (1, 3), (2, 1), (3, 3)]:
        await eshop.add(7, seller, product, 2, voucher="0.25" if product != 3 else "0")
    await settle_all(eshop.app, timeout=60)  # the payment and what follows it, warmed up too
    with compiled_again() as found:
        await checkout(eshop, 7, "t-four")
        await settle_all(eshop.app, timeout=60)
    assert not found, "\n".join(found)
    # Those cached statements wrote every row: four of each item's, and the vouchers' payments.
    [order] = await eshop.get("/order/7")
    [shipment] = await eshop.get("/shipment/7")
    assert (len(order["items"]), len(shipment["packages"])) == (4, 4)
    assert all(item["product"] is not None for item in order["items"]), order  # the JSONB references
    payments = await eshop.app.service(Payment).payments_of(7, order["order_id"])
    assert [p["type"] for p in payments] == ["CREDIT_CARD"] + ["VOUCHER"] * (len(payments) - 1)
    assert len(payments) >= 3, payments  # two items carry a voucher
    assert_holds(await eshop.verdict())
