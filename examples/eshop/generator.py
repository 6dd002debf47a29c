"""A marketplace to run the eShop on: sellers, customers, products, stock, discounts.

Like the benchmark's generator: ``products_per_seller`` products per seller (product ids
1..N within each seller), version "0", 4-digit prices and 3-digit freight with cents, the same
stock quantity for every product. Deterministic for a given seed. Load it in bulk through the
services (:func:`load`) or row by row through the HTTP API (:func:`load_through_api`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
from pydantic import BaseModel

from framework import App
from vmsdb_eshop.schemas import CustomerRow, DiscountRow, ProductData, SellerRow, StockRow
from vmsdb_eshop.services import Customer, Product, Seller, Stock

__all__ = ["Marketplace", "Scale", "generate", "load", "load_through_api"]

_FIRST = ("Ana", "Bruno", "Carla", "Diego", "Elisa", "Fábio", "Gabriela", "Hugo", "Iara", "João")
_LAST = ("Silva", "Souza", "Costa", "Santos", "Oliveira", "Pereira", "Lima", "Ferreira", "Alves")
_CITIES = (("São Paulo", "SP"), ("Rio de Janeiro", "RJ"), ("Curitiba", "PR"), ("Recife", "PE"))
_CATEGORIES = ("books", "garden", "health_beauty", "toys", "electronics", "sports", "housewares")
_BRANDS = ("VISA", "MASTERCARD", "ELO", "AMEX")
_CHUNK = 500


@dataclass(frozen=True)
class Scale:
    sellers: int = 10
    products_per_seller: int = 10
    customers: int = 100
    qty_per_product: int = 10_000
    #: Share of customers with a discount at one seller (read by order's @Query).
    discount_share: float = 0.2
    seed: int = 1


@dataclass
class Marketplace:
    sellers: list[SellerRow] = field(default_factory=list)
    customers: list[CustomerRow] = field(default_factory=list)
    products: list[ProductData] = field(default_factory=list)
    stock: list[StockRow] = field(default_factory=list)
    discounts: list[DiscountRow] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("sellers", "customers", "products", "stock")}


def _cents(rng: random.Random, low: int, high: int) -> Decimal:
    return Decimal(rng.randint(low, high)) / 100


def _person(rng: random.Random) -> dict[str, str]:
    city, state = rng.choice(_CITIES)
    return {
        "address": f"Rua {rng.choice(_LAST)}, {rng.randint(1, 999)}",
        "complement": f"apto {rng.randint(1, 300)}",
        "city": city,
        "state": state,
        "zip_code": f"{rng.randint(10000, 99999)}-{rng.randint(100, 999)}",
    }


def generate(scale: Scale = Scale()) -> Marketplace:
    """A deterministic marketplace of ``scale``."""
    rng = random.Random(scale.seed)
    market = Marketplace()
    for s in range(1, scale.sellers + 1):
        market.sellers.append(
            SellerRow(
                id=s,
                name=f"Seller {s}",
                company_name=f"{rng.choice(_LAST)} Comércio Ltda",
                email=f"seller{s}@example.com",
                phone=f"11 9{rng.randint(1000, 9999)}-0000",
                cnpj=f"{rng.randint(10**13, 10**14 - 1)}",
                **_person(rng),
            )
        )
        for p in range(1, scale.products_per_seller + 1):
            market.products.append(
                ProductData(
                    seller_id=s,
                    product_id=p,
                    name=f"Product {s}-{p}",
                    sku=f"SKU-{s}-{p}",
                    category=rng.choice(_CATEGORIES),
                    description=f"Item {p} of seller {s}",
                    price=_cents(rng, 100_000, 999_999),  # 4-digit prices, as the benchmark's
                    freight_value=_cents(rng, 10_000, 99_999),  # 3-digit freight
                )
            )
            market.stock.append(
                StockRow(seller_id=s, product_id=p, qty_available=scale.qty_per_product, data="")
            )
    expires = datetime.now(UTC) + timedelta(days=365)
    for c in range(1, scale.customers + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        market.customers.append(
            CustomerRow(
                id=c,
                first_name=first,
                last_name=last,
                birth_date="1990-01-01",
                card_number=f"4{rng.randint(10**14, 10**15 - 1)}",
                card_security_number="123",
                card_expiration=f"{rng.randint(1, 12):02d}{rng.randint(30, 35)}",
                card_holder_name=f"{first} {last}",
                card_type=rng.choice(_BRANDS),
                **_person(rng),
            )
        )
        if rng.random() < scale.discount_share:
            market.discounts.append(
                DiscountRow(
                    customer_id=c,
                    seller_id=rng.randint(1, scale.sellers),
                    percent=rng.choice((5, 10, 15)),
                    expires_at=expires,
                )
            )
    return market


def _chunks(rows: Sequence[Any]) -> list[list[Any]]:
    return [list(rows[i : i + _CHUNK]) for i in range(0, len(rows), _CHUNK)]


async def load(app: App, market: Marketplace) -> None:
    """Load ``market`` in bulk through the services' ingest functions; wait for the replicas."""
    for chunk in _chunks(market.sellers):
        await app.service(Seller).ingest(chunk)
    for chunk in _chunks(market.customers):
        await app.service(Customer).ingest(chunk)
    for chunk in _chunks(market.discounts):
        await app.service(Customer).add_discounts(chunk)
    for chunk in _chunks(market.stock):
        await app.service(Stock).ingest(chunk)
    for chunk in _chunks(market.products):
        await app.service(Product).ingest(chunk)
    await app.drain(timeout=120)


async def load_through_api(client: httpx.AsyncClient, market: Marketplace, *, concurrency: int = 8) -> None:
    """POST every row to the ingestion routes (as the benchmark driver does)."""
    gate = asyncio.Semaphore(concurrency)

    async def post(path: str, row: BaseModel) -> None:
        async with gate:
            response = await client.post(path, json=row.model_dump(mode="json"))
            response.raise_for_status()

    for path, rows in (
        ("/seller", market.sellers),
        ("/customer", market.customers),
        ("/stock", market.stock),
        ("/product", market.products),
    ):
        await asyncio.gather(*(post(path, row) for row in rows))
