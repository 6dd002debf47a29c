"""The leases a cart holds, when they no longer hold: expired or reaped before the checkout, the
replacement of a line or the seal. A refused lease is the stock's business rule (lease on the
spot, or OUT_OF_STOCK), never a failed handler."""

from __future__ import annotations

from datetime import timedelta

from framework.testing import advance_clock
from tests.e2e.conftest import Eshop, assert_holds
from vmsdb_eshop.config import settings

PAST_THE_LEASE = timedelta(seconds=settings().lease_seconds + 60)


async def test_a_checkout_whose_leases_expired_takes_the_stock_on_the_spot(eshop: Eshop) -> None:
    assert (await eshop.add(1, 1, 1, 2))["reserved"] is True
    assert (await eshop.add(1, 2, 1, 3))["reserved"] is True
    await advance_clock(eshop.app, PAST_THE_LEASE)
    response = await eshop.checkout(1, "t-expired")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "SUCCESS"
    await eshop.app.drain()
    for (seller, product), qty in {(1, 1): 2, (2, 1): 3}.items():
        stock = await eshop.get(f"/stock/{seller}/{product}")
        assert (stock["qty_available"], stock["qty_reserved"], stock["ytd"]) == (100 - qty, 0, qty)
    assert_holds(await eshop.verdict())


async def test_an_expired_lease_whose_stock_was_taken_is_out_of_stock(eshop: Eshop) -> None:
    assert (await eshop.add(1, 1, 1, 60))["reserved"] is True
    await advance_clock(eshop.app, PAST_THE_LEASE)
    # Customer 1's lease no longer holds: customer 2 leases and buys what it held.
    assert (await eshop.add(2, 1, 1, 70))["reserved"] is True
    assert (await eshop.checkout(2, "t-taker")).status_code == 200
    refused = await eshop.checkout(1, "t-late")
    assert refused.status_code == 409, refused.text
    assert (refused.json()["source"], refused.json()["reason"]) == ("stock", "1/1 OUT_OF_STOCK")
    await eshop.app.drain()
    stock = await eshop.get("/stock/1/1")
    assert (stock["qty_available"], stock["qty_reserved"], stock["ytd"]) == (30, 0, 70)
    assert_holds(await eshop.verdict())
