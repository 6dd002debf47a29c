"""One customer session or seller update at a time, through the whole event chain."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from tests.e2e.conftest import Eshop, assert_holds


async def test_checkout_ships_one_order_per_transaction(eshop: Eshop) -> None:
    await eshop.add(1, 1, 1, 2)
    await eshop.add(1, 2, 3, 1)
    response = await eshop.checkout(1, "t-ok")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "tid": "t-ok",
        "type": "CUSTOMER_SESSION",
        "actorId": "1",
        "status": "SUCCESS",
        "source": "shipment",
        "reason": None,
    }
    # The driver retries a checkout up to three times: the retry is answered, nothing is redone.
    again = await eshop.checkout(1, "t-ok")
    assert again.status_code == 200 and again.json() == response.json()

    await eshop.app.drain()  # the order and seller hear of the shipment after the answer
    (order,) = await eshop.get("/order/1")
    assert order["tid"] == "t-ok" and order["status"] == "READY_FOR_SHIPMENT"
    assert sorted((i["seller_id"], i["product_id"], i["quantity"]) for i in order["items"]) == [
        (1, 1, 2),
        (2, 3, 1),
    ]
    (shipment,) = await eshop.get("/shipment/1")
    assert [p["status"] for p in shipment["packages"]] == ["shipped", "shipped"]
    assert (await eshop.get("/cart/1"))["items"] == []
    assert len(await eshop.get("/cart/1/history/t-ok")) == 2
    stock = await eshop.get("/stock/1/1")
    assert (stock["qty_available"], stock["ytd"], stock["qty_reserved"]) == (98, 2, 0)
    assert_holds(await eshop.verdict())


async def test_out_of_stock_checkout_is_not_accepted(eshop: Eshop) -> None:
    first = await eshop.add(1, 1, 1, 80)
    second = await eshop.add(2, 1, 1, 30)  # only 20 left that nobody holds
    assert first["reserved"] is True and second["reserved"] is False

    refused = await eshop.checkout(2, "t-short")
    assert refused.status_code == 409
    body = refused.json()
    assert (body["error"], body["status"], body["source"]) == ("Conflict", "NOT_ACCEPTED", "stock")
    assert "OUT_OF_STOCK" in body["reason"]
    assert (await eshop.checkout(1, "t-held")).status_code == 200

    assert await eshop.get("/order/2") == []
    stock = await eshop.get("/stock/1/1")
    assert (stock["qty_available"], stock["ytd"]) == (20, 80)
    assert_holds(await eshop.verdict())


async def test_item_of_a_replaced_product_is_unavailable(eshop: Eshop) -> None:
    leased = await eshop.add(1, 1, 2, 3)  # version "0", leased
    await eshop.add(1, 1, 3, 1)
    product = {**eshop.market.products[1].model_dump(mode="json"), "version": "v-new"}
    replaced = await eshop.http.put("/product", json=product)
    assert replaced.status_code == 200, replaced.text
    assert (replaced.json()["tid"], replaced.json()["source"]) == ("v-new", "stock")

    response = await eshop.checkout(1, "t-replaced")
    assert response.status_code == 200
    (order,) = await eshop.get("/order/1")
    assert [(i["seller_id"], i["product_id"]) for i in order["items"]] == [(1, 3)]
    stock = await eshop.get("/stock/1/2")
    assert (stock["version"], stock["qty_available"], stock["ytd"]) == ("v-new", 100, 0)

    await eshop.add(2, 1, 2, 1)  # still the old version: the only item, so nothing to sell
    alone = await eshop.checkout(2, "t-old-only")
    assert alone.status_code == 409 and "UNAVAILABLE" in alone.json()["reason"]
    verdict = await eshop.verdict()
    assert_holds(verdict)
    assert leased["lease_id"] is not None  # ... and it was released, as the lease check shows


async def test_price_update_committed_before_checkout_is_charged(eshop: Eshop) -> None:
    old = eshop.price(2, 2)
    await eshop.add(1, 2, 2, 1, price=old)
    update = {"sellerId": 2, "productId": 2, "price": str(old + 1), "version": "0", "instanceId": "p-1"}
    response = await eshop.http.patch("/product", json=update)
    assert response.status_code == 200
    assert (response.json()["type"], response.json()["source"]) == ("PRICE_UPDATE", "cart")
    # The item already in a cart takes the new price.
    assert (await eshop.checkout(1, "t-after-1")).status_code == 200
    (item,) = await eshop.get("/cart/1/history/t-after-1")
    assert Decimal(item["unit_price"]) == old + 1
    # A stale client adds the item at the old price after the update: as in the benchmark, the
    # cart drops it (its replica shows the same version at another price), and the cart is
    # CHECKOUT_SENT all the same.
    await eshop.add(2, 2, 2, 1, price=old)
    diverged = await eshop.checkout(2, "t-after-2")
    assert diverged.status_code == 409
    assert diverged.json()["source"] == "cart"
    assert "PRICE_DIVERGENCE" in diverged.json()["reason"]
    assert await eshop.get("/cart/2/history/t-after-2") == []
    assert (await eshop.get("/cart/2"))["status"] == "CHECKOUT_SENT"
    assert Decimal((await eshop.get("/product/2/2"))["price"]) == old + 1


async def test_price_updates_racing_checkouts(eshop: Eshop) -> None:
    """Checkouts and price updates of the same product in flight together: each checkout is
    charged the price committed before it, or a later one, never an older one — or, as the
    benchmark's cart does, it drops the item whose replica shows a new price at the same
    version (PRICE_DIVERGENCE) and is not accepted."""
    customers = range(1, 9)
    for c in customers:
        await eshop.add(c, 3, 1, 1)
    price = eshop.price(3, 1)

    async def update(n: int) -> None:
        body = {"sellerId": 3, "productId": 1, "price": str(price + n), "version": "0", "instanceId": f"p{n}"}
        assert (await eshop.http.patch("/product", json=body)).status_code == 200

    accepted: list[int] = []

    async def checkout(c: int) -> None:
        await asyncio.sleep(0.01 * c)
        response = await eshop.checkout(c, f"t{c}")
        if response.status_code == 200:
            accepted.append(c)
        else:
            assert response.status_code == 409, response.text
            assert response.json()["reason"] == "3/1 PRICE_DIVERGENCE", response.text

    await asyncio.gather(*(update(n) for n in range(1, 5)), *(checkout(c) for c in customers))
    charged = {Decimal((await eshop.get(f"/cart/{c}/history/t{c}"))[0]["unit_price"]) for c in accepted}
    assert charged <= {price + n for n in range(5)}
    assert_holds(await eshop.verdict())


async def test_item_of_a_deleted_product_is_dropped_by_the_cart(eshop: Eshop) -> None:
    product = {**eshop.market.products[2].model_dump(mode="json"), "version": "gone", "status": "deleted"}
    assert (await eshop.http.put("/product", json=product)).status_code == 200
    await eshop.add(6, 1, 3, 1, version="gone")
    response = await eshop.checkout(6, "t-deleted")
    assert response.status_code == 409
    assert (response.json()["source"], response.json()["reason"]) == ("cart", "1/3 DELETED")
    assert (await eshop.get("/cart/6"))["status"] == "CHECKOUT_SENT"
    # With an item the stock refuses too, the stock's answer names both, the cart's first.
    await eshop.add(7, 1, 3, 1, version="gone")
    assert (await eshop.add(7, 1, 2, 200))["reserved"] is False  # more than there is
    both = await eshop.checkout(7, "t-deleted-2")
    assert both.status_code == 409
    assert (both.json()["source"], both.json()["reason"]) == ("stock", "1/3 DELETED, 1/2 OUT_OF_STOCK")
    assert_holds(await eshop.verdict())


async def test_failed_payment_gives_the_stock_back(eshop: Eshop) -> None:
    await eshop.add(3, 2, 1, 4)
    response = await eshop.checkout(3, "t-card", expired_card=True)
    assert response.status_code == 409
    assert (response.json()["source"], response.json()["reason"]) == ("payment", "card expired")
    await eshop.app.drain()
    (order,) = await eshop.get("/order/3")
    assert order["status"] == "PAYMENT_FAILED"
    assert await eshop.get("/shipment/3") == []
    stock = await eshop.get("/stock/2/1")
    assert (stock["qty_available"], stock["qty_reserved"], stock["ytd"]) == (100, 0, 0)
    assert (await eshop.get("/customer/3"))["failed_payment_count"] == 1
    assert_holds(await eshop.verdict())


async def test_delivery_concludes_shipments_and_empties_the_dashboard(eshop: Eshop) -> None:
    await eshop.add(1, 1, 1, 1)
    await eshop.add(1, 2, 1, 1)
    assert (await eshop.checkout(1, "t-ship")).status_code == 200
    await eshop.app.drain()
    view = (await eshop.get("/seller/dashboard/1"))["sellerView"]
    assert (view["count_orders"], view["count_items"]) == (1, 1)

    delivered = await eshop.http.patch("/shipment/d-1")
    assert delivered.json() == {"tid": "d-1", "delivered": 2}  # one order, two sellers
    await eshop.app.drain()
    (order,) = await eshop.get("/order/1")
    assert order["status"] == "DELIVERED"
    assert (await eshop.get("/shipment/1"))[0]["status"] == "concluded"
    assert (await eshop.get("/customer/1"))["delivery_count"] == 2
    assert (await eshop.get("/seller/dashboard/1"))["orderEntries"] == []
    assert (await eshop.http.patch("/shipment/d-2")).json()["delivered"] == 0
    assert_holds(await eshop.verdict())


async def test_seal_and_reset(eshop: Eshop) -> None:
    assert (await eshop.add(4, 1, 1, 5))["reserved"] is True
    assert (await eshop.http.patch("/cart/4/seal")).json() == {"customer_id": 4, "dropped": 1}
    await eshop.add(5, 1, 1, 100)  # everything: only possible because the seal released its lease
    assert (await eshop.checkout(5, "t-all")).status_code == 200
    assert (await eshop.http.patch("/reset")).status_code == 200
    stock = await eshop.get("/stock/1/1")
    assert (stock["qty_available"], stock["ytd"]) == (100, 0)
    assert await eshop.get("/order/5") == []
    assert_holds(await eshop.verdict())


async def test_replacements_racing_checkouts(eshop: Eshop) -> None:
    """A replacement committed before a checkout's reservation request is applied before it:
    the replaced version is never reserved after that (stock's ProductUpdated precedence)."""
    customers = range(1, 9)
    for c in customers:
        await eshop.add(c, 2, 2, 1)
    product = eshop.market.products[4].model_dump(mode="json")
    assert (product["seller_id"], product["product_id"]) == (2, 2)

    async def replace(n: int) -> None:
        await asyncio.sleep(0.015 * n)
        assert (await eshop.http.put("/product", json={**product, "version": f"v{n}"})).status_code == 200

    async def checkout(c: int) -> int:
        await asyncio.sleep(0.01 * c)
        return (await eshop.checkout(c, f"t{c}")).status_code

    results = await asyncio.gather(*(replace(n) for n in range(1, 4)), *(checkout(c) for c in customers))
    assert set(results[3:]) <= {200, 409}
    assert_holds(await eshop.verdict())
