"""The leases a cart holds, when they no longer hold: expired or reaped before the checkout, the
replacement of a line or the seal. A refused lease is the stock's business rule (lease on the
spot, or OUT_OF_STOCK), never a failed handler."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from framework.testing import advance_clock
from tests.e2e.conftest import Eshop, assert_holds
from vmsdb_eshop.config import settings

PAST_THE_LEASE = timedelta(seconds=settings().lease_seconds + 60)


async def lease_statuses(eshop: Eshop) -> list[str]:
    async with eshop.app.core.admin() as conn:
        found = await conn.execute(text("SELECT status FROM vms.leases ORDER BY created_at"))
        return [row.status for row in found]


async def forget_ended_leases(eshop: Eshop) -> None:
    """What the App's housekeeping does to old leases: they are gone, their ids unknown."""
    async with eshop.app.core.admin() as conn:
        await conn.execute(text("DELETE FROM vms.leases"))


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


async def test_a_reaped_lease_neither_blocks_the_cart_nor_the_checkout(eshop: Eshop) -> None:
    assert (await eshop.add(3, 1, 2, 1))["reserved"] is True
    assert (await eshop.add(3, 1, 3, 1))["reserved"] is True
    await advance_clock(eshop.app, PAST_THE_LEASE)
    await forget_ended_leases(eshop)
    # Replacing a line releases its lease: an unknown one is nothing to give back.
    assert (await eshop.add(3, 1, 2, 4))["reserved"] is True
    response = await eshop.checkout(3, "t-reaped")
    assert response.status_code == 200, response.text
    await eshop.app.drain()
    assert [(await eshop.get(f"/stock/1/{p}"))["ytd"] for p in (2, 3)] == [4, 1]
    assert await lease_statuses(eshop) == ["consumed", "consumed"]  # the new lease, the spot one
    assert_holds(await eshop.verdict())


async def test_seal_gives_back_live_leases_and_skips_gone_ones(eshop: Eshop) -> None:
    assert (await eshop.add(4, 1, 1, 5))["reserved"] is True
    await advance_clock(eshop.app, PAST_THE_LEASE)
    await forget_ended_leases(eshop)
    assert (await eshop.add(4, 2, 2, 100))["reserved"] is True  # a live lease on everything
    assert (await eshop.http.patch("/cart/4/seal")).json() == {"customer_id": 4, "dropped": 2}
    assert await lease_statuses(eshop) == ["released"]
    assert (await eshop.add(5, 2, 2, 100))["reserved"] is True  # the seal gave it back
    assert_holds(await eshop.verdict())
