"""G10 on the eShop: back up the customer service, keep selling, lose it, restore it, report."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import text

from tests.e2e.conftest import Eshop, assert_holds
from vmsdb_eshop.disaster import DisasterOptions, run_disaster
from vmsdb_eshop.generator import Scale


async def test_a_lost_customer_service_is_restored_and_its_amnesia_reported(
    vmsdb_database: str, tmp_path: Path
) -> None:
    options = DisasterOptions(
        service="customer",
        mode="consistency",
        duration=1.5,
        concurrency=2,
        scale=Scale(sellers=2, products_per_seller=3, customers=8, qty_per_product=1000),
        edits=8,
        data_dir=tmp_path,
        database_url=vmsdb_database,
    )
    result = await run_disaster(options)
    assert result.workload.completed > 0
    state = result.recovery
    # The order service holds references to customers: it was expected to answer, and did.
    assert (state.service, state.status, state.expected) == ("customer", "completed", ("order",))
    report = result.report
    assert report.weakly_consistent, report.to_json()  # Definition 3
    assert not report.uncovered and not report.local
    assert report.repairs, "the restore must open amnesia intervals"
    assert {r.amnesia.service for r in report.repairs} == {"customer"}
    assert all(r.amnesia.lo == state.t_backup for r in report.repairs if r.amnesia.recovered_from == ())
    assert any(r.amnesia.uri is None for r in report.repairs)  # entities the backup never knew
    data = json.loads(json.dumps(result.to_json(), default=str))
    assert data["report"]["weakly_consistent"] and data["recovery"]["status"] == "completed"


async def test_orders_reference_their_customer_and_products_and_reset_gives_them_back(eshop: Eshop) -> None:
    await eshop.add(3, 1, 1, 2)
    assert (await eshop.checkout(3, "t-ref")).status_code == 200
    await eshop.app.drain(timeout=30)
    [order] = await eshop.get("/order/3")
    assert order["customer"]["uri"] == "vms://customer/customers/3"
    assert order["customer"]["copy"]["first_name"]  # a cached copy of the customer's row
    assert order["items"][0]["product"]["uri"] == "vms://product/products/1/1"

    async def counts() -> dict[str, int]:
        async with eshop.app.core.admin() as conn:
            rows = await conn.execute(text("SELECT uri, d FROM vms.entities WHERE d > 0"))
            return dict(rows.all())

    assert await counts() == {"vms://customer/customers/3": 1, "vms://product/products/1/1": 1}
    assert (await eshop.http.patch("/reset")).status_code == 200
    assert await counts() == {}
    assert_holds(await eshop.verdict())


async def test_an_order_whose_product_is_gone_references_the_rest_once(eshop: Eshop) -> None:
    """A deleted product leaves its line's reference empty; the order's other references
    (taken in the same statement, which answers the gone one as refused) are each counted once."""
    await eshop.add(4, 1, 1, 1)
    await eshop.add(4, 2, 1, 1)
    async with eshop.app.core.admin() as conn:
        # The second line's product: the first line's reference is taken before it is refused.
        await conn.execute(text("DELETE FROM product.products WHERE seller_id = 2 AND product_id = 1"))
    assert (await eshop.checkout(4, "t-gone")).status_code == 200
    await eshop.app.drain(timeout=30)
    [order] = await eshop.get("/order/4")
    assert [item["product"] and item["product"]["uri"] for item in order["items"]] == [
        "vms://product/products/1/1",
        None,
    ]
    assert order["customer"]["uri"] == "vms://customer/customers/4"
    async with eshop.app.core.admin() as conn:
        counted = dict((await conn.execute(text("SELECT uri, d FROM vms.entities WHERE d > 0"))).all())
    assert counted == {"vms://customer/customers/4": 1, "vms://product/products/1/1": 1}
