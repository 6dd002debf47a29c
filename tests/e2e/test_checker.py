"""The checker can say no: on an empty database, and against each property broken behind the
services' backs (administrator SQL after a real run), naming what it found.

One run of the vMODB mix (no deliveries, so seller entries stay in progress); each mutation is
applied in a savepoint, judged, and rolled back, so every case starts from the same run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import pytest
from sqlalchemy import text

from dbcore.eventlog import prune
from framework import App
from tests.e2e.conftest import Eshop, assert_holds
from vmsdb_eshop.check import CheckResult, Evidence, check, check_causal, evidence_of, judge, read_tables
from vmsdb_eshop.generator import Scale
from vmsdb_eshop.ledger import Checkout, Ledger
from vmsdb_eshop.payments import settle_all
from vmsdb_eshop.services import SERVICES
from vmsdb_eshop.workload import MIXES, Workload, WorkloadConfig

_OPEN = "('INVOICED', 'PAYMENT_PROCESSED', 'READY_FOR_SHIPMENT', 'IN_TRANSIT')"


@pytest.fixture
def scale() -> Scale:
    """Stock no run here can sell out (a fast machine sold out the default 100 units a product
    in the 6 s zipfian run, and the sale after a replacement then found nothing to sell)."""
    return Scale(sellers=3, products_per_seller=3, customers=10, qty_per_product=100_000, discount_share=0.5)


async def test_an_empty_database_fails_with_nothing_to_check(vmsdb_app_factory: Any) -> None:
    async with vmsdb_app_factory(SERVICES, create_tables=False, migrate=True) as app:
        assert isinstance(app, App)
        verdict = await check(app)
    assert not verdict.ok
    assert all(not r.ok for r in verdict.results), [(r.name, r.summary()) for r in verdict.results if r.ok]
    assert any(r.summary() == "nothing to check" for r in verdict.results)


def _replaced_version_sold(db: dict[str, list[dict[str, Any]]], evidence: Evidence) -> str:
    """SQL that sells, in an order sent after a replacement was acknowledged, the old version."""
    ledger = evidence.ledger
    assert ledger is not None
    sent = {(c.customer_id, c.tid): c.sent for c in ledger.checkouts}
    tids = {(o["customer_id"], o["order_id"]): o["tid"] for o in db["orders"]}
    for item in db["order_items"]:
        key = (item["seller_id"], item["product_id"])
        moment = sent.get((item["customer_id"], tids[(item["customer_id"], item["order_id"])]))
        states = ledger.products[key]
        replaced = [i for i, s in enumerate(states) if s.kind == "replace" and moment and s.acked < moment]
        if replaced:
            old = states[replaced[-1] - 1].version
            where = " AND ".join(f"{c} = {item[c]}" for c in ("customer_id", "order_id", "order_item_id"))
            return f"UPDATE \"order\".order_items SET version = '{old}' WHERE {where}"
    raise AssertionError("no product was sold after a replacement of it")


async def _replace_then_sell(eshop: Eshop, ledger: Ledger) -> None:
    """Acting as the driver (and recording it so): replace the product with the most stock
    left, then sell its new version, so a sale after a replacement exists whatever the run drew."""
    # Every chain of the run finished first: a checkout whose client gave up may still run, and
    # this sale must not meet its customer's cart half-way through it.
    await settle_all(eshop.app, timeout=60)
    free = {key: (await eshop.get(f"/stock/{key[0]}/{key[1]}"))["qty_free"] for key in ledger.products}
    key = max(free, key=lambda k: free[k])
    price = ledger.products[key][-1].price
    row = next(p for p in eshop.market.products if (p.seller_id, p.product_id) == key)
    body = {**row.model_dump(mode="json"), "price": str(price), "version": "v-mutation"}
    sent = time.monotonic()
    replaced = await eshop.http.put("/product", json=body)
    assert replaced.status_code == 200, replaced.text
    ledger.acknowledged(key, "replace", "v-mutation", price, sent, time.monotonic())
    customer = eshop.market.customers[-1].id
    eshop.provider.failure_rate = 0.0  # this sale must go through
    await eshop.add(customer, *key, 1, version="v-mutation", price=price)
    sent = time.monotonic()
    sold = await eshop.checkout(customer, "t-mutation")
    assert sold.status_code == 200, sold.text
    ledger.checkouts.append(Checkout(customer, "t-mutation", sent, "SUCCESS", (key,)))


MUTATIONS: list[tuple[str, str, str, str]] = [
    # (case, SQL, the check that must fail, what its report must name)
    (
        "stock created from nothing",
        "UPDATE stock.stock_items SET qty_available = qty_available + 5, qty_free = qty_free + 5, "
        "qty_initial = qty_initial + 5 WHERE (seller_id, product_id) = (1, 1)",
        "stock: no oversell, conserved",
        "item 1/1",
    ),
    (
        "a package deleted",
        "DELETE FROM shipment.packages WHERE ctid = (SELECT min(ctid) FROM shipment.packages)",
        "checkouts: one order, payment, shipment",
        "packages",
    ),
    (
        "a payment duplicated",
        "INSERT INTO payment.order_payments (customer_id, order_id, sequential, tid, type, installments, "
        "value, status) SELECT customer_id, order_id, 99, tid, type, installments, value, status "
        "FROM payment.order_payments WHERE sequential = 1 AND status = 'succeeded' LIMIT 1",
        "checkouts: one order, payment, shipment",
        "payments",
    ),
    (
        "a stale price written into an order",
        'UPDATE "order".order_items SET unit_price = unit_price - 1 WHERE ctid = '
        '(SELECT min(ctid) FROM "order".order_items)',
        "prices: acknowledged updates seen by later checkouts",
        "charged",
    ),
    (
        "an item of a replaced version sold",
        "(found in the run)",
        "replacements: replaced versions never sold",
        "replaced by",
    ),
    (
        "a dashboard entry altered",
        f"UPDATE seller.order_entries SET total_amount = total_amount + 1 WHERE ctid = "
        f"(SELECT min(ctid) FROM seller.order_entries WHERE order_status IN {_OPEN})",
        "seller view = sums of in-progress entries",
        "seller",
    ),
    (
        "a dead letter left behind",
        "INSERT INTO vms.dead_letters (subscriber, event_type, error, attempts) "
        "VALUES ('stock', 'ReserveStock', 'boom', 3)",
        "no dead letters",
        "ReserveStock at stock: boom",
    ),
]


async def test_each_check_finds_its_property_broken_behind_the_services_backs(eshop: Eshop) -> None:
    config = WorkloadConfig(
        duration=6.0, concurrency=8, mix=MIXES["vmodb"], distribution="zipfian", payment_failure_rate=0.1
    )
    eshop.provider.failure_rate = config.payment_failure_rate
    result = await Workload(eshop.http, eshop.market, config).run()
    await _replace_then_sell(eshop, result.ledger)
    evidence = evidence_of(eshop.market, result, provider=eshop.provider)
    assert_holds(await eshop.verdict(evidence), complete=True)
    # The checks keep what they need themselves: with the core's log pruned, they still judge.
    async with eshop.app.core.admin() as conn:
        assert await prune(conn, 0) > 0
    assert_holds(await check(eshop.app, evidence), complete=True)

    async with eshop.app.core.admin() as conn:
        for case, sql, name, named in MUTATIONS:
            savepoint = await conn.begin_nested()
            if sql.startswith("("):
                sql = _replaced_version_sold(await read_tables(conn), evidence)
            await conn.execute(text(sql))
            verdict = judge(await read_tables(conn), evidence)
            await savepoint.rollback()
            found = {r.name: r for r in verdict.results}[name]
            assert not found.ok, f"{case}: {name} missed it"
            assert named in found.summary(), f"{case}: {found.summary()}"
        # Unbroken, the same judgement holds again (each mutation was rolled back).
        assert judge(await read_tables(conn), evidence).ok


async def test_eshop_check_exits_non_zero_on_a_fresh_empty_database(vmsdb_database: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmsdb_eshop.cli",
        "check",
        env={**os.environ, "VMSDB_DATABASE_URL": vmsdb_database, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 1, output.decode()
    assert "nothing to check" in output.decode()


async def _acknowledged_price_update(eshop: Eshop, ledger: Ledger, key: tuple[int, int], tid: str) -> None:
    price = ledger.products[key][-1].price + 1
    body = {"sellerId": key[0], "productId": key[1], "price": str(price), "version": "0", "instanceId": tid}
    sent = time.monotonic()
    response = await eshop.http.patch("/product", json=body)
    assert response.status_code == 200, response.text
    ledger.acknowledged(key, "price", "0", price, sent, time.monotonic())


async def test_the_causal_check_finds_a_cart_that_saw_y_but_not_an_earlier_x(eshop: Eshop) -> None:
    """x's price update is acknowledged before y's is sent; a cart then holds both. Written
    back to x's old price behind the cart's back, the history shows the benchmark's anomaly."""
    ledger = Ledger()
    x, y = (1, 1), (1, 2)
    for key in (x, y):
        ledger.seed(key, "0", eshop.price(*key))
    await _acknowledged_price_update(eshop, ledger, x, "px")
    await _acknowledged_price_update(eshop, ledger, y, "py")
    for key in (x, y):
        await eshop.add(7, *key, 1, price=ledger.products[key][-1].price)
    sent = time.monotonic()
    assert (await eshop.checkout(7, "c7")).status_code == 200
    ledger.checkouts.append(Checkout(7, "c7", sent, "SUCCESS", (x, y)))
    evidence = Evidence(ledger=ledger)

    async def judged() -> CheckResult:
        ledger.histories[(7, "c7")] = await eshop.get("/cart/7/history/c7")
        return check_causal({}, evidence)

    assert (await judged()).ok
    async with eshop.app.core.admin() as conn:
        await conn.execute(
            text(
                "UPDATE cart.cart_history SET unit_price = :old "
                "WHERE customer_id = 7 AND tid = 'c7' AND seller_id = 1 AND product_id = 1"
            ),
            {"old": ledger.products[x][0].price},
        )
    broken = await judged()
    assert not broken.ok
    assert "cart 7/c7: saw 1/2" in broken.summary(), broken.summary()


async def test_a_stale_line_of_a_replaced_version_stays_out_of_the_history(eshop: Eshop) -> None:
    """The anomaly a run once found: x added at its old price after x's update was applied (the
    client read the price before the update was acknowledged), then x replaced, then y's
    update. Forwarded to the stock, the stale x would sit in the history beside the new y; the
    cart drops it as UNAVAILABLE, so the cart never shows x older than an update before y's."""
    ledger = Ledger()
    x, y = (1, 1), (1, 2)
    for key in (x, y):
        ledger.seed(key, "0", eshop.price(*key))
    stale = ledger.products[x][-1].price
    await _acknowledged_price_update(eshop, ledger, x, "px")
    await eshop.add(8, *x, 1, price=stale)  # built before the update was acknowledged
    row = next(p for p in eshop.market.products if (p.seller_id, p.product_id) == x)
    price = ledger.products[x][-1].price
    body = {**row.model_dump(mode="json"), "price": str(price), "version": "x-2"}
    sent = time.monotonic()
    replaced = await eshop.http.put("/product", json=body)
    assert replaced.status_code == 200, replaced.text
    ledger.acknowledged(x, "replace", "x-2", price, sent, time.monotonic())
    await _acknowledged_price_update(eshop, ledger, y, "py")
    await eshop.add(8, *y, 1, price=ledger.products[y][-1].price)
    sent = time.monotonic()
    assert (await eshop.checkout(8, "c8")).status_code == 200
    ledger.checkouts.append(Checkout(8, "c8", sent, "SUCCESS", (x, y)))
    history = await eshop.get("/cart/8/history/c8")
    assert [(h["seller_id"], h["product_id"]) for h in history] == [y]
    ledger.histories[(8, "c8")] = history
    assert check_causal({}, Evidence(ledger=ledger)).violations == []
