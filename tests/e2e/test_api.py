"""The HTTP surface: bad bodies answer 422 naming the field (and change nothing), the routes of
the benchmark's API are all there, and the API works over real TCP through uvicorn."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import text

from framework import App
from framework.fastapi import run_lifespan
from vmsdb_eshop.app import create_api
from vmsdb_eshop.generator import Scale, generate, load_through_api
from vmsdb_eshop.services import SERVICES

CART_ITEM = {
    "SellerId": 1,
    "ProductId": 1,
    "ProductName": "p",
    "UnitPrice": "10.00",
    "FreightValue": "1.00",
    "Quantity": 1,
    "Voucher": "0",
    "Version": "0",
}
CHECKOUT = {"CustomerId": 1, "PaymentType": "BOLETO", "instanceId": "t1"}
PRICE = {"sellerId": 1, "productId": 1, "price": "12.00", "version": "0", "instanceId": "p1"}
PRODUCT = {"seller_id": 1, "product_id": 1, "name": "p", "price": "10.00", "version": "v1"}


def _without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


BAD_BODIES = [
    ("PATCH", "/cart/1/add", _without(CART_ITEM, "Quantity"), "Quantity"),
    ("PATCH", "/cart/1/add", {**CART_ITEM, "UnitPrice": "cheap"}, "UnitPrice"),
    ("PATCH", "/cart/1/add", {**CART_ITEM, "Quantity": 0}, "Quantity"),
    ("POST", "/cart/1/checkout", {**CHECKOUT, "PaymentType": "BITCOIN"}, "PaymentType"),
    ("POST", "/cart/1/checkout", _without(CHECKOUT, "PaymentType"), "PaymentType"),
    ("PATCH", "/product", _without(PRICE, "price"), "price"),
    ("PATCH", "/product", {**PRICE, "price": "-1"}, "price"),
    ("PUT", "/product", _without(PRODUCT, "version"), "version"),
    ("POST", "/product", _without(PRODUCT, "name"), "name"),
    ("POST", "/seller", {"id": "seven"}, "id"),
    ("POST", "/customer", {"id": 1, "last_name": "Silva"}, "first_name"),
    ("POST", "/stock", {"seller_id": 1, "product_id": 1, "qty_available": -5}, "qty_available"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "field"), BAD_BODIES, ids=[f"{m} {p} {f}" for m, p, _, f in BAD_BODIES]
)
async def test_bad_body_is_422_naming_the_field(
    vmsdb_app_factory: Any, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    async with vmsdb_app_factory(SERVICES) as app:
        api = create_api(app)
        transport = httpx.ASGITransport(app=api)
        async with run_lifespan(api), httpx.AsyncClient(transport=transport, base_url="http://eshop") as http:
            response = await http.request(method, path, json=body)
            assert response.status_code == 422, response.text
            assert [e["loc"] for e in response.json()["detail"]] == [["body", field]]
            # Nothing was written, and nothing was started.
            assert (await http.get("/cart/1")).status_code == 404
            assert (await http.get("/product/1/1")).status_code == 404
            await app.drain()
            async with app.core.admin() as conn:
                assert (await conn.execute(text("SELECT count(*) FROM vms.events"))).scalar_one() == 0


ROUTES = {
    ("POST", "/seller"),
    ("POST", "/customer"),
    ("POST", "/product"),
    ("POST", "/stock"),
    ("PATCH", "/cart/{customer_id}/add"),
    ("POST", "/cart/{customer_id}/checkout"),
    ("PATCH", "/cart/{customer_id}/seal"),
    ("GET", "/cart/{customer_id}/history/{tid}"),
    ("PATCH", "/product"),
    ("PUT", "/product"),
    ("GET", "/seller/dashboard/{seller_id}"),
    ("PATCH", "/shipment/{tid}"),
    ("PATCH", "/reset"),
    ("PATCH", "/cleanup"),
    ("GET", "/stock/{seller_id}/{product_id}"),
    ("GET", "/product/{seller_id}/{product_id}"),
    ("GET", "/customer/{customer_id}"),
    ("GET", "/order/{customer_id}"),
    ("GET", "/cart/{customer_id}"),
    ("GET", "/shipment/{customer_id}"),
    ("GET", "/seller/{seller_id}"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def _serve(api: Any, port: int) -> AsyncIterator[str]:
    """Run ``api`` under uvicorn on 127.0.0.1:``port`` (it runs the lifespan itself)."""
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
        assert not task.done(), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_served_over_tcp_with_openapi(vmsdb_app_factory: Any) -> None:
    """Ingest through the API (as the driver does), then one session, over uvicorn."""
    market = generate(Scale(sellers=2, products_per_seller=2, customers=3, qty_per_product=10))
    async with (
        vmsdb_app_factory(SERVICES) as app,
        _serve(create_api(app), _free_port()) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        openapi = (await http.get("/openapi.json")).json()
        served = {(m.upper(), p) for p, ops in openapi["paths"].items() for m in ops}
        assert served == ROUTES
        assert (await http.get("/docs")).status_code == 200

        await load_through_api(http, market)
        await app.drain()
        assert (await http.get("/stock/2/2")).json()["qty_available"] == 10
        item = {**CART_ITEM, "UnitPrice": str(market.products[0].price), "Quantity": 3}
        assert (await http.patch("/cart/1/add", json=item)).json()["reserved"] is True
        checkout = await http.post("/cart/1/checkout", json=CHECKOUT)
        assert checkout.status_code == 200, checkout.text
        assert checkout.json()["status"] == "SUCCESS"
        (order,) = (await http.get("/order/1")).json()
        assert order["items"][0]["quantity"] == 3
        assert (await http.get("/customer/99")).json()["error"] == "NotFound"


def test_one_service_can_be_served_alone() -> None:
    api = create_api(App(SERVICES), only=["cart"])
    assert {p.split("/")[1] for p in api.openapi()["paths"]} == {"cart", "reset", "cleanup"}
    with pytest.raises(ValueError, match="unknown service"):
        create_api(App(SERVICES), only=["warehouse"])
