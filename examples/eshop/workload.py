"""The benchmark's transaction mix, driven over HTTP by concurrent clients.

Like the Online Marketplace driver in CONTINUOUS mode: ``concurrency`` workers run transactions
back to back, each drawn from the mix (customer session 30%, dashboard 5%, price update 3%,
product update 2%, delivery 60%). A customer never runs two sessions at once, and the driver
never has two updates of one product in flight, so it always knows each product's current price
and version. Latency is measured from the request to the answer (a session's add-to-cart calls
are not timed, as in the benchmark); a non-2xx answer counts as an abort.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

from vmsdb_eshop.check import dashboard_consistent
from vmsdb_eshop.generator import Marketplace
from vmsdb_eshop.schemas import TransactionType
from vmsdb_eshop.services.common import money

__all__ = ["Mix", "TxStats", "Workload", "WorkloadConfig", "WorkloadResult"]

T = TransactionType


@dataclass(frozen=True)
class Mix:
    """Shares (percent) of each transaction type."""

    customer_session: float = 30
    query_dashboard: float = 5
    price_update: float = 3
    update_product: float = 2
    update_delivery: float = 60

    def weights(self) -> dict[TransactionType, float]:
        """Share by transaction type (each field is named after its type)."""
        return {t: float(getattr(self, t.value.lower())) for t in T}


@dataclass(frozen=True)
class WorkloadConfig:
    duration: float = 30.0
    concurrency: int = 8
    mix: Mix = Mix()
    max_items: int = 10
    max_quantity: int = 10
    voucher_probability: float = 0.05
    #: Share of checkouts paid with an expired card (their payment fails).
    payment_failure_rate: float = 0.03
    seed: int = 7


@dataclass
class TxStats:
    count: int = 0
    aborts: int = 0
    latencies: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` (0..100) in milliseconds; 0 without samples."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000


@dataclass
class WorkloadResult:
    duration: float
    stats: dict[TransactionType, TxStats]
    #: Checkout outcomes: SUCCESS, or where it was not accepted ("NOT_ACCEPTED/stock", ...).
    outcomes: Counter[str]
    dashboard_anomalies: int
    errors: list[str]

    @property
    def completed(self) -> int:
        return sum(s.count - s.aborts for s in self.stats.values())

    @property
    def throughput(self) -> float:
        return self.completed / self.duration if self.duration else 0.0


@dataclass
class _Known:
    """What the driver knows of a product: its current price and version."""

    price: Decimal
    version: str
    name: str
    freight: Decimal
    row: dict[str, Any]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Workload:
    """Runs the mix against ``client`` (any base URL, or an in-process ASGI transport)."""

    def __init__(self, client: httpx.AsyncClient, market: Marketplace, config: WorkloadConfig) -> None:
        self.client = client
        self.config = config
        self.rng = random.Random(config.seed)
        self.sellers = [s.id for s in market.sellers]
        self.products = {
            (p.seller_id, p.product_id): _Known(
                p.price, p.version, p.name, p.freight_value, p.model_dump(mode="json")
            )
            for p in market.products
        }
        self.keys = list(self.products)
        self.idle: asyncio.Queue[int] = asyncio.Queue()
        for c in market.customers:
            self.idle.put_nowait(c.id)
        self.cards = {c.id: c for c in market.customers}
        self.stats: dict[TransactionType, TxStats] = {t: TxStats() for t in T}
        self.outcomes: Counter[str] = Counter()
        self.anomalies = 0
        self.errors: list[str] = []
        self.completed = 0
        types, weights = zip(*config.mix.weights().items(), strict=True)
        self._types, self._weights = list(types), list(weights)
        # Each transaction type runs the method named after it (customer_session, ...).
        self._runners: dict[TransactionType, Callable[[str], Any]] = {
            t: getattr(self, t.value.lower()) for t in T
        }

    async def run(self, on_progress: Callable[[float, int], None] | None = None) -> WorkloadResult:
        """Run for ``config.duration`` seconds; transactions under way then are finished."""
        start = time.monotonic()
        deadline = start + self.config.duration
        # TIDs are unique across runs too: a checkout's tid names its event (a retry is a no-op).
        run = uuid.uuid4().hex[:8]

        async def worker(wid: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                kind = self.rng.choices(self._types, self._weights)[0]
                await self._runners[kind](f"{run}-{wid}-{n}")
                self.completed += 1
                if on_progress is not None:
                    on_progress(time.monotonic() - start, self.completed)

        await asyncio.gather(*(worker(w) for w in range(1, self.config.concurrency + 1)))
        return WorkloadResult(
            time.monotonic() - start, self.stats, self.outcomes, self.anomalies, self.errors
        )

    async def _timed(self, kind: TransactionType, request: Any) -> httpx.Response | None:
        """Send one timed request; record its latency, and an abort when it is not 2xx."""
        stats = self.stats[kind]
        began = time.monotonic()
        try:
            response: httpx.Response = await request
        except httpx.HTTPError as err:
            stats.count += 1
            stats.aborts += 1
            self._error(f"{kind}: {type(err).__name__}: {err}")
            return None
        stats.count += 1
        stats.latencies.append(time.monotonic() - began)
        if not response.is_success:
            stats.aborts += 1
            if response.status_code != 409:
                self._error(f"{kind}: HTTP {response.status_code}: {response.text[:300]}")
        return response

    def _error(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)

    # -- transactions ----------------------------------------------------------------------------

    async def customer_session(self, tid: str) -> None:
        """Add k distinct items (not timed), then check out (timed)."""
        customer = await self.idle.get()
        try:
            count = self.rng.randint(1, min(self.config.max_items, len(self.keys)))
            for seller_id, product_id in self.rng.sample(self.keys, count):
                known = self.products[(seller_id, product_id)]
                voucher = (
                    money(known.price / 10) if self.rng.random() < self.config.voucher_probability else 0
                )
                item = {
                    "SellerId": seller_id,
                    "ProductId": product_id,
                    "ProductName": known.name,
                    "UnitPrice": str(known.price),
                    "FreightValue": str(known.freight),
                    "Quantity": self.rng.randint(1, self.config.max_quantity),
                    "Voucher": str(voucher),
                    "Version": known.version,
                }
                await self.client.patch(f"/cart/{customer}/add", json=item)
            response = await self._timed(
                T.CUSTOMER_SESSION,
                self.client.post(f"/cart/{customer}/checkout", json=self._checkout(customer, tid)),
            )
            if response is not None and response.status_code in (200, 409):
                body = response.json()
                self.outcomes[
                    body["status"] if response.status_code == 200 else f"{body['status']}/{body['source']}"
                ] += 1
        finally:
            self.idle.put_nowait(customer)

    def _checkout(self, customer: int, tid: str) -> dict[str, Any]:
        c = self.cards[customer]
        payment = self.rng.choice(("CREDIT_CARD", "DEBIT_CARD", "BOLETO"))
        expired = self.rng.random() < self.config.payment_failure_rate
        if expired:
            payment = "CREDIT_CARD"
        return {
            "CustomerId": customer,
            "FirstName": c.first_name,
            "LastName": c.last_name,
            "Street": c.address,
            "Complement": c.complement,
            "City": c.city,
            "State": c.state,
            "ZipCode": c.zip_code,
            "PaymentType": payment,
            "CardNumber": c.card_number,
            "CardHolderName": c.card_holder_name,
            "CardExpiration": "0120" if expired else c.card_expiration,
            "CardSecurityNumber": c.card_security_number,
            "CardBrand": c.card_type,
            "Installments": self.rng.randint(1, 10) if payment == "CREDIT_CARD" else 1,
            "instanceId": tid,
        }

    async def query_dashboard(self, tid: str) -> None:
        seller = self.rng.choice(self.sellers)
        response = await self._timed(T.QUERY_DASHBOARD, self.client.get(f"/seller/dashboard/{seller}"))
        if response is not None and response.is_success and not dashboard_consistent(response.json()):
            self.anomalies += 1

    async def _with_product(self, send: Callable[[_Known], Any]) -> None:
        """Run a seller update on a product no other worker is updating (the driver's lock)."""
        for _ in range(10):
            known = self.products[self.rng.choice(self.keys)]
            if not known.lock.locked():
                break
        async with known.lock:
            await send(known)

    async def price_update(self, tid: str) -> None:
        async def send(known: _Known) -> None:
            price = money(known.price * (100 + self.rng.randint(1, 9)) / 100)
            body = {
                "sellerId": known.row["seller_id"],
                "productId": known.row["product_id"],
                "price": str(price),
                "version": known.version,
                "instanceId": tid,
            }
            response = await self._timed(T.PRICE_UPDATE, self.client.patch("/product", json=body))
            if response is not None and response.is_success:
                known.price = price

        await self._with_product(send)

    async def update_product(self, tid: str) -> None:
        async def send(known: _Known) -> None:
            body = {**known.row, "price": str(known.price), "version": tid}
            response = await self._timed(T.UPDATE_PRODUCT, self.client.put("/product", json=body))
            if response is not None and response.is_success:
                known.version = tid

        await self._with_product(send)

    async def update_delivery(self, tid: str) -> None:
        await self._timed(T.UPDATE_DELIVERY, self.client.patch(f"/shipment/{tid}"))
