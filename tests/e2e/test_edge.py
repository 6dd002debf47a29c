"""The eShop's edge (issue 15): outcomes bound to their requester, idempotent and honest business
endpoints, and input checked before anything reaches a service or the event log."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import text

from tests.e2e.conftest import Eshop, assert_holds

INT32_MAX = 2**31 - 1


async def _events(eshop: Eshop, kind: str) -> int:
    async with eshop.app.core.admin() as conn:
        count = await conn.execute(text("SELECT count(*) FROM vms.events WHERE type = :t"), {"t": kind})
        return int(count.scalar_one())


async def _all_events(eshop: Eshop) -> int:
    async with eshop.app.core.admin() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM vms.events"))).scalar_one())


def _price(eshop: Eshop, tid: str, price: str, *, version: str = "0") -> dict[str, Any]:
    return {"sellerId": 1, "productId": 1, "price": price, "version": version, "instanceId": tid}


def _product(eshop: Eshop, version: str, **changes: Any) -> dict[str, Any]:
    (row,) = [p for p in eshop.market.products if (p.seller_id, p.product_id) == (1, 2)]
    return {**row.model_dump(mode="json"), "version": version, **changes}


# -- outcomes bound to their requester (finding 2) ---------------------------------------------


async def test_a_checkout_id_used_by_another_customer_is_refused(eshop: Eshop) -> None:
    await eshop.add(1, 1, 1, 1)
    first = await eshop.checkout(1, "t-shared")
    assert first.status_code == 200 and first.json()["actorId"] == "1"

    await eshop.add(2, 1, 2, 1)
    published = await _events(eshop, "CheckoutRequest")
    stolen = await eshop.checkout(2, "t-shared")
    assert stolen.status_code == 409, stolen.text
    body = stolen.json()
    assert body["error"] == "Conflict" and "t-shared" in body["detail"]
    assert body.get("actorId") != "1"  # never the other customer's mark
    assert await _events(eshop, "CheckoutRequest") == published
    assert len((await eshop.get("/cart/2"))["items"]) == 1  # customer 2's cart is untouched

    # The same customer repeating the request gets the same answer, and nothing is redone.
    again = await eshop.checkout(1, "t-shared")
    assert again.status_code == 200 and again.json() == first.json()
    assert await _events(eshop, "CheckoutRequest") == published
    assert_holds(await eshop.verdict())


async def test_a_checkout_for_an_unknown_customer_is_404(eshop: Eshop) -> None:
    before = await _all_events(eshop)
    response = await eshop.checkout(999, "t-nobody")
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "NotFound"
    assert await _all_events(eshop) == before


# -- idempotent and honest business endpoints (findings 5 and 7) -------------------------------


async def test_a_repeated_price_update_is_answered_once(eshop: Eshop) -> None:
    first = await eshop.http.patch("/product", json=_price(eshop, "p-once", "12.00"))
    assert first.status_code == 200, first.text
    again = await eshop.http.patch("/product", json=_price(eshop, "p-once", "12.00"))
    assert again.status_code == 200 and again.json() == first.json()
    assert await _events(eshop, "PriceUpdated") == 1

    # The same id for another price: refused, nothing published, the first price stays.
    other = await eshop.http.patch("/product", json=_price(eshop, "p-once", "13.00"))
    assert other.status_code == 409, other.text
    assert await _events(eshop, "PriceUpdated") == 1
    assert (await eshop.get("/product/1/1"))["price"] == "12.00"


async def test_a_price_update_answers_once_the_cart_has_the_price(eshop: Eshop) -> None:
    for n, price in enumerate(("12.00", "12.50", "13.00")):
        response = await eshop.http.patch("/product", json=_price(eshop, f"p-{n}", price))
        assert response.status_code == 200, response.text
        async with eshop.app.core.admin() as conn:
            replica = await conn.execute(
                text("SELECT price FROM cart.replica_products WHERE seller_id = 1 AND product_id = 1")
            )
            assert str(replica.scalar_one()) == price


async def test_unknown_products_and_versions_are_refused_and_publish_nothing(eshop: Eshop) -> None:
    before = await _all_events(eshop)
    unknown = await eshop.http.patch("/product", json={**_price(eshop, "p-x", "5.00"), "productId": 99})
    assert unknown.status_code == 404 and unknown.json()["error"] == "NotFound"
    stale = await eshop.http.patch("/product", json=_price(eshop, "p-v", "5.00", version="no-such"))
    assert stale.status_code == 409 and stale.json()["error"] == "Conflict"
    replaced = await eshop.http.put("/product", json={**_product(eshop, "v9"), "product_id": 99})
    assert replaced.status_code == 404 and replaced.json()["error"] == "NotFound"
    item = {"SellerId": 1, "ProductId": 99, "UnitPrice": "1.00", "Quantity": 1, "Version": "0"}
    added = await eshop.http.patch("/cart/1/add", json=item)
    assert added.status_code == 404 and added.json()["error"] == "NotFound"
    nobody = await eshop.http.patch("/cart/999/add", json={**item, "ProductId": 1})
    assert nobody.status_code == 404 and nobody.json()["error"] == "NotFound"
    negative = await eshop.http.patch("/cart/-1/add", json={**item, "ProductId": 1})
    assert negative.status_code == 422
    assert await _all_events(eshop) == before
    assert (await eshop.http.get("/cart/1")).status_code == 404


async def test_a_repeated_replacement_publishes_one_update(eshop: Eshop) -> None:
    first = await eshop.http.put("/product", json=_product(eshop, "v-1"))
    assert first.status_code == 200, first.text
    again = await eshop.http.put("/product", json=_product(eshop, "v-1"))
    assert again.status_code == 200 and again.json() == first.json()
    updates = await _events(eshop, "ProductUpdated")
    changed = await eshop.http.put("/product", json=_product(eshop, "v-1", name="another name"))
    assert changed.status_code == 409, changed.text
    assert await _events(eshop, "ProductUpdated") == updates
    async with eshop.app.core.admin() as conn:
        stock = await conn.execute(
            text("SELECT version FROM stock.stock_items WHERE seller_id = 1 AND product_id = 2")
        )
        assert stock.scalar_one() == "v-1"
    assert_holds(await eshop.verdict())


# -- input checked at the edge (finding 6) -----------------------------------------------------

CART_ITEM = {"SellerId": 1, "ProductId": 1, "UnitPrice": "10.00", "Quantity": 1, "Version": "0"}
CUSTOMER = {"id": 50, "first_name": "Ana", "last_name": "Silva"}
PRODUCT = {"seller_id": 1, "product_id": 50, "name": "p", "price": "10.00"}
CHECKOUT = {"CustomerId": 1, "PaymentType": "BOLETO", "instanceId": "t-bad"}

BAD_INPUT = [
    ("PATCH", "/cart/1/add", {**CART_ITEM, "SellerId": INT32_MAX + 1}, ["body", "SellerId"]),
    ("PATCH", "/cart/1/add", {**CART_ITEM, "Version": "v" * 201}, ["body", "Version"]),
    ("PATCH", "/cart/1/add", {**CART_ITEM, "ProductName": "a\x00b"}, ["body", "ProductName"]),
    ("PATCH", "/cart/1/add", {**CART_ITEM, "UnitPrice": "1e11"}, ["body", "UnitPrice"]),
    ("PATCH", f"/cart/{INT32_MAX + 1}/add", CART_ITEM, ["path", "customer_id"]),
    ("POST", f"/cart/{INT32_MAX + 1}/checkout", CHECKOUT, ["path", "customer_id"]),
    ("POST", "/cart/1/checkout", {**CHECKOUT, "instanceId": "t\x00"}, ["body", "instanceId"]),
    ("POST", "/cart/1/checkout", {**CHECKOUT, "Street": "\ud800"}, ["body", "Street"]),
    # VOUCHER is a payment line's type, not a way to pay: such an order had no main payment line.
    ("POST", "/cart/1/checkout", {**CHECKOUT, "PaymentType": "VOUCHER"}, ["body", "PaymentType"]),
    ("POST", "/customer", {**CUSTOMER, "success_payment_count": -1}, ["body", "success_payment_count"]),
    ("POST", "/customer", {**CUSTOMER, "delivery_count": INT32_MAX + 1}, ["body", "delivery_count"]),
    ("POST", "/customer", {**CUSTOMER, "id": INT32_MAX + 1}, ["body", "id"]),
    ("POST", "/seller", {"id": 7, "name": "x\x00"}, ["body", "name"]),
    ("POST", "/product", {**PRODUCT, "status": "s" * 21}, ["body", "status"]),
    ("POST", "/product", {**PRODUCT, "version": "v" * 201}, ["body", "version"]),
    ("PUT", "/product", {**PRODUCT, "version": "v" * 201}, ["body", "version"]),
    (
        "POST",
        "/stock",
        {"seller_id": 1, "product_id": 1, "qty_available": INT32_MAX + 1},
        ["body", "qty_available"],
    ),
    ("POST", "/stock", {"seller_id": 1, "product_id": 1, "qty_available": 5, "ytd": -1}, ["body", "ytd"]),
    (
        "PATCH",
        "/product",
        {"sellerId": 1, "productId": 1, "price": "1", "version": "\x00"},
        ["body", "version"],
    ),
    ("GET", f"/customer/{INT32_MAX + 1}", None, ["path", "customer_id"]),
    ("GET", f"/stock/1/{INT32_MAX + 1}", None, ["path", "product_id"]),
    ("GET", f"/seller/dashboard/{INT32_MAX + 1}", None, ["path", "seller_id"]),
    ("GET", f"/cart/1/history/{'t' * 201}", None, ["path", "tid"]),
    ("PATCH", f"/shipment/{'t' * 201}", None, ["path", "tid"]),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "loc"),
    BAD_INPUT,
    ids=[f"{m} {p[:30]} {'.'.join(c)}" for m, p, _, c in BAD_INPUT],
)
async def test_out_of_range_input_is_422_naming_the_field(
    eshop: Eshop, method: str, path: str, body: dict[str, Any] | None, loc: list[str]
) -> None:
    before = await _all_events(eshop)
    # As JSON text: a lone surrogate travels escaped, as any JSON client may send it.
    content = None if body is None else json.dumps(body)
    headers = {"content-type": "application/json"}
    response = await eshop.http.request(method, path, content=content, headers=headers)
    assert response.status_code == 422, response.text
    assert [e["loc"][:2] for e in response.json()["detail"]] == [loc]
    assert await _all_events(eshop) == before


async def test_the_openapi_documents_every_answer(eshop: Eshop) -> None:
    paths = (await eshop.get("/openapi.json"))["paths"]
    statuses = {(m.upper(), p): set(op["responses"]) for p, ops in paths.items() for m, op in ops.items()}
    for (method, path), operation in ((k, paths[k[1]][k[0].lower()]) for k in statuses):
        assert "503" in statuses[(method, path)], (method, path)  # database unavailable
        if "{" in path or "requestBody" in operation:
            assert "422" in statuses[(method, path)], (method, path)
    for chain in (("POST", "/cart/{customer_id}/checkout"), ("PATCH", "/product"), ("PUT", "/product")):
        assert {"200", "400", "404", "409", "422", "503", "504"} <= statuses[chain], chain
    assert {"404", "409"} <= statuses[("PATCH", "/cart/{customer_id}/add")]
    assert "404" in statuses[("GET", "/customer/{customer_id}")]
