"""The eShop over HTTP: a started App of the eight services on a fresh database, seeded, with a
client that talks to its FastAPI application (in process, through httpx's ASGI transport)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from framework import App
from framework.fastapi import run_lifespan
from vmsdb_eshop.app import create_api
from vmsdb_eshop.check import NEEDS_LEDGER, Evidence, Verdict, check
from vmsdb_eshop.generator import Marketplace, Scale, generate, load
from vmsdb_eshop.payments import settle_all
from vmsdb_eshop.provider import SimulatedProvider
from vmsdb_eshop.services import SERVICES


@dataclass
class Eshop:
    """The running eShop and a few calls the tests share."""

    app: App
    api: FastAPI
    http: httpx.AsyncClient
    market: Marketplace
    #: The payment provider the API's processor charges (tests may set its failure rate).
    provider: SimulatedProvider

    def price(self, seller_id: int, product_id: int) -> Decimal:
        return next(
            p.price for p in self.market.products if (p.seller_id, p.product_id) == (seller_id, product_id)
        )

    async def add(
        self,
        customer: int,
        seller: int,
        product: int,
        qty: int,
        *,
        version: str = "0",
        price: Any = None,
        voucher: str = "0",
    ) -> dict[str, Any]:
        item = {
            "SellerId": seller,
            "ProductId": product,
            "ProductName": f"p{seller}-{product}",
            "UnitPrice": str(price if price is not None else self.price(seller, product)),
            "FreightValue": "1.00",
            "Quantity": qty,
            "Voucher": voucher,
            "Version": version,
        }
        response = await self.http.patch(f"/cart/{customer}/add", json=item)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def checkout(self, customer: int, tid: str, *, expired_card: bool = False) -> httpx.Response:
        body = {
            "CustomerId": customer,
            "FirstName": "Ana",
            "LastName": "Silva",
            "Street": "Rua A",
            "Complement": "",
            "City": "Recife",
            "State": "PE",
            "ZipCode": "50000-000",
            "PaymentType": "CREDIT_CARD",
            "CardNumber": "4111111111111111",
            "CardHolderName": "Ana Silva",
            "CardExpiration": "0120" if expired_card else "1230",
            "CardSecurityNumber": "123",
            "CardBrand": "VISA",
            "Installments": 2,
            "instanceId": tid,
        }
        return await self.http.post(f"/cart/{customer}/checkout", json=body)

    async def get(self, path: str) -> Any:
        response = await self.http.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    async def verdict(self, evidence: Evidence | None = None) -> Verdict:
        """Wait for every chain and payment to finish, then run the consistency checks."""
        await settle_all(self.app, timeout=60)
        return await check(self.app, evidence)


def assert_holds(verdict: Verdict, *, complete: bool = False) -> None:
    """No check found a violation; ``complete``: and every check examined something.

    Without ``complete`` (a test that drove a few requests by hand, with no ledger), a check
    that had nothing to examine, or needs the driver's ledger, is not held against the test.
    """
    failed = [
        f"{r.name}: {r.summary()}"
        for r in verdict.results
        if not r.ok and (complete or (r.violations and r.violations != [NEEDS_LEDGER]))
    ]
    assert not failed, "\n".join(failed)


@pytest.fixture
def scale() -> Scale:
    """The marketplace a test starts with (override in a test module)."""
    return Scale(sellers=3, products_per_seller=3, customers=10, qty_per_product=100, discount_share=0.5)


@pytest.fixture
def provider() -> SimulatedProvider:
    """The payment provider the eShop's processor charges (override in a test module)."""
    return SimulatedProvider(latency=0.002)


@pytest.fixture
async def eshop(vmsdb_app_factory: Any, scale: Scale, provider: SimulatedProvider) -> AsyncIterator[Eshop]:
    # The eShop's schemas come from its migrations, as in the demo and in production.
    async with vmsdb_app_factory(SERVICES, create_tables=False, migrate=True) as app:
        api = create_api(app, provider=provider)
        transport = httpx.ASGITransport(app=api)
        async with (
            run_lifespan(api),
            httpx.AsyncClient(transport=transport, base_url="http://eshop", timeout=60) as http,
        ):
            market = generate(scale)
            await load(app, market)
            yield Eshop(app, api, http, market, provider)
