"""UPDATE_DELIVERY under concurrency: deliveries that choose the same orders neither wait for each
other's packages nor deliver a package twice, and every shipment concludes exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter

from sqlalchemy import text

from tests.e2e.conftest import Eshop, assert_holds


async def _notifications(eshop: Eshop) -> tuple[Counter[tuple[str, ...]], Counter[tuple[str, ...]]]:
    """How often each package was reported delivered, and each shipment step reported."""
    async with eshop.app.core.admin() as conn:
        deliveries = await conn.execute(
            text(
                "SELECT payload->>'customer_id', payload->>'order_id', payload->>'package_id' "
                "FROM vms.events WHERE type = 'DeliveryNotification'"
            )
        )
        steps = await conn.execute(
            text(
                "SELECT payload->>'customer_id', payload->>'order_id', payload->>'status' "
                "FROM vms.events WHERE type = 'ShipmentNotification'"
            )
        )
        return Counter(tuple(r) for r in deliveries), Counter(tuple(r) for r in steps)


async def _order_of_two_sellers(eshop: Eshop, tid: str) -> None:
    """Customer 1's order 1: one package of seller 1, one of seller 2, shipped."""
    await eshop.add(1, 1, 1, 1)
    await eshop.add(1, 2, 1, 1)
    assert (await eshop.checkout(1, tid)).status_code == 200
    await eshop.app.drain()


async def _concluded_once(eshop: Eshop) -> None:
    """Customer 1's order 1 was delivered: each package reported once, each step once."""
    await eshop.app.drain()
    (shipment,) = await eshop.get("/shipment/1")
    assert shipment["status"] == "concluded"
    assert [p["status"] for p in shipment["packages"]] == ["delivered", "delivered"]
    deliveries, steps = await _notifications(eshop)
    assert deliveries == Counter({("1", "1", "1"): 1, ("1", "1", "2"): 1})
    assert steps == Counter(
        {("1", "1", "approved"): 1, ("1", "1", "delivery_in_progress"): 1, ("1", "1", "concluded"): 1}
    )
    (order,) = await eshop.get("/order/1")
    assert order["status"] == "DELIVERED"
    assert_holds(await eshop.verdict())


async def test_a_delivery_skips_the_packages_another_delivery_holds(eshop: Eshop) -> None:
    await _order_of_two_sellers(eshop, "t-held")

    # Another delivery is in the middle of delivering seller 1's package (it holds its lock
    # until the block ends).
    async with eshop.app.core.admin() as held:
        await held.execute(text("SELECT 1 FROM shipment.packages WHERE seller_id = 1 FOR UPDATE"))
        # This one does not wait for it: it delivers seller 2's package and leaves seller 1's.
        response = await asyncio.wait_for(eshop.http.patch("/shipment/d-1"), timeout=10)
        assert response.json() == {"tid": "d-1", "delivered": 1}

    # The other delivery delivered nothing: the package is still to deliver, and the next does.
    assert (await eshop.http.patch("/shipment/d-2")).json() == {"tid": "d-2", "delivered": 1}
    await _concluded_once(eshop)


async def test_concurrent_deliveries_deliver_each_package_once(eshop: Eshop) -> None:
    # Orders spread over the three sellers, so that concurrent deliveries choose the same
    # orders, and deliver packages of one order in different transactions.
    for customer in range(1, 9):
        for seller in (1, 2, 3):
            await eshop.add(customer, seller, 1 + customer % 3, 1)
            await eshop.add(customer, seller, 1 + (customer + 1) % 3, 1)
        assert (await eshop.checkout(customer, f"t-{customer}")).status_code == 200
    await eshop.app.drain()
    packages = 8 * 3 * 2

    delivered = 0
    for attempt in range(50):
        answers = await asyncio.gather(*(eshop.http.patch(f"/shipment/d-{attempt}-{n}") for n in range(6)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        delivered += sum(a.json()["delivered"] for a in answers)
        if delivered >= packages:
            break
    assert delivered == packages
    await eshop.app.drain()

    deliveries, steps = await _notifications(eshop)
    assert len(deliveries) == packages and set(deliveries.values()) == {1}
    shipments = {(c, o) for c, o, _ in steps}
    assert len(shipments) == 8
    for customer, order in shipments:
        for step in ("approved", "delivery_in_progress", "concluded"):
            assert steps[customer, order, step] == 1, (customer, order, step)
    for customer in range(1, 9):
        (shipment,) = await eshop.get(f"/shipment/{customer}")
        assert shipment["status"] == "concluded"
        assert (await eshop.get(f"/customer/{customer}"))["delivery_count"] == 6
        (order,) = await eshop.get(f"/order/{customer}")
        assert order["status"] == "DELIVERED"
    assert_holds(await eshop.verdict())


async def _waiting_for_locks(eshop: Eshop, count: int) -> None:
    """Until ``count`` backends wait for a lock."""
    for _ in range(200):
        async with eshop.app.core.admin() as conn:
            waiting = await conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            )
            if waiting.scalar_one() >= count:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never saw {count} backend(s) waiting for a lock")


async def test_two_deliveries_of_one_order_conclude_its_shipment(eshop: Eshop) -> None:
    """Each of two concurrent deliveries delivers one seller's package of the same order; the
    one that takes the shipment's lock second counts no package left, and concludes it."""
    await _order_of_two_sellers(eshop, "t-split")

    # Each admin block holds its locks until it ends (and commits).
    async with eshop.app.core.admin() as shipment:
        await shipment.execute(text("SELECT 1 FROM shipment.shipments FOR UPDATE"))
        async with eshop.app.core.admin() as package:
            await package.execute(text("SELECT 1 FROM shipment.packages WHERE seller_id = 2 FOR UPDATE"))
            # The first delivers seller 1's package (seller 2's is held), then waits for the
            # shipment.
            first = asyncio.create_task(eshop.http.patch("/shipment/d-1"))
            await _waiting_for_locks(eshop, 1)
        # The second skips seller 1's package (the first holds it), delivers seller 2's, then
        # waits for the shipment too.
        second = asyncio.create_task(eshop.http.patch("/shipment/d-2"))
        await _waiting_for_locks(eshop, 2)
    answers = await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
    assert [a.json()["delivered"] for a in answers] == [1, 1]
    await _concluded_once(eshop)
