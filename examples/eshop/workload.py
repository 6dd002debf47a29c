"""The benchmark's transaction mix, driven over HTTP by concurrent clients.

As the Online Marketplace driver: in ``continuous`` mode ``concurrency`` workers run
transactions back to back (TIDs ``worker-n``); in ``closed`` mode (the driver's CONTROL) a
submitter keeps ``concurrency`` transactions outstanding and starts one as each completes
(integer TIDs). Each transaction is drawn from the mix: ``paper`` (customer session 30%,
dashboard 5%, price update 3%, product update 2%, delivery 60%) or ``vmodb`` (70/10/10/10, no
delivery). Sellers and the products within a seller are drawn uniformly or zipfian (exponent 1,
as ``sellerZipfian``/``productZipfian``); a session adds k = U[1..items] distinct products, a
voucher on ~5% of them. A customer never runs two sessions at once, and the driver never has
two updates of one product in flight, so it knows each product's history (``Ledger``).
Latency is measured from the request to the answer (a session's add-to-cart calls are not
timed, as in the benchmark); a non-2xx answer counts as an abort, by cause.
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

from vmsdb_eshop.generator import Marketplace
from vmsdb_eshop.ledger import Checkout, Ledger
from vmsdb_eshop.schemas import TransactionType
from vmsdb_eshop.services.common import money
from vmsdb_eshop.services.seller import VIEW_TOTALS

__all__ = ["MIXES", "Mix", "TxStats", "Workload", "WorkloadConfig", "WorkloadResult", "dashboard_consistent"]

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


#: The paper's default mix, and the one vMODB's evaluation used.
MIXES = {
    "paper": Mix(),
    "vmodb": Mix(
        customer_session=70, query_dashboard=10, price_update=10, update_product=10, update_delivery=0
    ),
}


@dataclass(frozen=True)
class WorkloadConfig:
    duration: float = 30.0
    concurrency: int = 8
    mix: Mix = Mix()
    #: "uniform" or "zipfian" draws of sellers and of products within a seller.
    distribution: str = "uniform"
    zipf_exponent: float = 1.0
    #: "continuous" (workers back to back) or "closed" (CONTROL: a fixed number outstanding).
    mode: str = "continuous"
    max_items: int = 10
    max_quantity: int = 10
    voucher_probability: float = 0.05
    #: Share of payments the simulated provider declines (drive_mix gives it to the provider).
    payment_failure_rate: float = 0.03
    seed: int = 7

    def __post_init__(self) -> None:
        if self.distribution not in ("uniform", "zipfian"):
            raise ValueError(f"distribution must be uniform or zipfian, got {self.distribution!r}")
        if self.mode not in ("continuous", "closed"):
            raise ValueError(f"mode must be continuous or closed, got {self.mode!r}")
        if not 1 <= self.max_items <= 10:
            raise ValueError(f"items per cart must be within 1..10, got {self.max_items}")


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
    #: Aborts by (transaction type, cause): "409 stock", "HTTP 500", "ReadTimeout", ...
    aborts: Counter[tuple[TransactionType, str]] = field(default_factory=Counter)
    ledger: Ledger = field(default_factory=Ledger)

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
        self.sellers = sorted(s.id for s in market.sellers)
        self.products = {
            (p.seller_id, p.product_id): _Known(
                p.price, p.version, p.name, p.freight_value, p.model_dump(mode="json")
            )
            for p in market.products
        }
        self.keys = list(self.products)
        self.ledger = Ledger()
        for key, known in self.products.items():
            self.ledger.seed(key, known.version, known.price)
        self.by_seller: dict[int, list[tuple[int, int]]] = {}
        for key in sorted(self.keys):
            self.by_seller.setdefault(key[0], []).append(key)
        self.sellers = [s for s in self.sellers if s in self.by_seller] or self.sellers
        self.aborts: Counter[tuple[TransactionType, str]] = Counter()
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

        async def one(tid: str) -> None:
            kind = self.rng.choices(self._types, self._weights)[0]
            await self._runners[kind](tid)
            self.completed += 1
            if on_progress is not None:
                on_progress(time.monotonic() - start, self.completed)

        async def worker(wid: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                await one(f"{run}-{wid}-{n}")

        async def control() -> None:
            """CONTROL: ``concurrency`` outstanding; each completion lets the next one in."""
            slots = asyncio.Semaphore(self.config.concurrency)
            running: set[asyncio.Task[None]] = set()
            n = 0
            while time.monotonic() < deadline:
                await slots.acquire()
                n += 1
                task = asyncio.create_task(one(f"{run}-{n}"))
                running.add(task)
                task.add_done_callback(lambda t: (running.discard(t), slots.release()))
            await asyncio.gather(*running)

        if self.config.mode == "closed":
            await control()
        else:
            await asyncio.gather(*(worker(w) for w in range(1, self.config.concurrency + 1)))
        duration = time.monotonic() - start
        await self.collect_histories()
        return WorkloadResult(
            duration,
            self.stats,
            self.outcomes,
            self.anomalies,
            self.errors,
            self.aborts,
            self.ledger,
        )

    async def collect_histories(self) -> None:
        """Ask the cart what each successful checkout with two items of one seller took out
        (``GET /cart/{customerId}/history/{tid}``), for the causal anomaly check."""
        wanted = [c for c in self.ledger.checkouts if c.status == "SUCCESS" and c.shares_a_seller()]
        for checkout in wanted:
            response = await self.client.get(f"/cart/{checkout.customer_id}/history/{checkout.tid}")
            if response.is_success:
                self.ledger.histories[(checkout.customer_id, checkout.tid)] = response.json()
            else:
                self._error(f"history of {checkout.tid}: HTTP {response.status_code}")

    # -- draws -----------------------------------------------------------------------------------

    def _pick(self, n: int) -> int:
        """An index in ``range(n)``: uniform, or zipfian (rank r with weight 1 / r^s)."""
        if self.config.distribution == "uniform" or n == 1:
            return self.rng.randrange(n)
        weights = _zipf_weights(n, self.config.zipf_exponent)
        return self.rng.choices(range(n), cum_weights=weights)[0]

    def _key(self) -> tuple[int, int]:
        """A (seller, product): the seller drawn first, then one of its products."""
        products = self.by_seller[self.sellers[self._pick(len(self.sellers))]]
        return products[self._pick(len(products))]

    def _keys(self, count: int) -> list[tuple[int, int]]:
        """``count`` distinct keys (fewer if the draws keep repeating, as with a steep zipf)."""
        chosen: dict[tuple[int, int], None] = {}
        for _ in range(count * 20):
            chosen[self._key()] = None
            if len(chosen) == count:
                break
        return list(chosen)

    async def _timed(self, kind: TransactionType, request: Any) -> httpx.Response | None:
        """Send one timed request; record its latency, and an abort when it is not 2xx."""
        stats = self.stats[kind]
        began = time.monotonic()
        try:
            response: httpx.Response = await request
        except httpx.HTTPError as err:
            stats.count += 1
            stats.aborts += 1
            self.aborts[(kind, type(err).__name__)] += 1
            self._error(f"{kind}: {type(err).__name__}: {err}")
            return None
        stats.count += 1
        stats.latencies.append(time.monotonic() - began)
        if not response.is_success:
            stats.aborts += 1
            if response.status_code == 409:
                self.aborts[(kind, f"409 {response.json().get('source', '?')}")] += 1
            else:
                self.aborts[(kind, f"HTTP {response.status_code}")] += 1
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
            keys = self._keys(count)
            for seller_id, product_id in keys:
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
            sent = time.monotonic()
            response = await self._timed(
                T.CUSTOMER_SESSION,
                self.client.post(f"/cart/{customer}/checkout", json=self._checkout(customer, tid)),
            )
            status = "no answer" if response is None else f"HTTP {response.status_code}"
            if response is not None and response.status_code in (200, 409):
                body = response.json()
                status = body["status"]
                self.outcomes[
                    body["status"] if response.status_code == 200 else f"{body['status']}/{body['source']}"
                ] += 1
            self.ledger.checkouts.append(Checkout(customer, tid, sent, status, tuple(keys)))
        finally:
            self.idle.put_nowait(customer)

    def _checkout(self, customer: int, tid: str) -> dict[str, Any]:
        c = self.cards[customer]
        payment = self.rng.choice(("CREDIT_CARD", "DEBIT_CARD", "BOLETO"))
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
            "CardExpiration": c.card_expiration,
            "CardSecurityNumber": c.card_security_number,
            "CardBrand": c.card_type,
            "Installments": self.rng.randint(1, 10) if payment == "CREDIT_CARD" else 1,
            "instanceId": tid,
        }

    async def query_dashboard(self, tid: str) -> None:
        """The dashboard, checked as it arrives: its totals must add up over its entries."""
        seller = self.sellers[self._pick(len(self.sellers))]
        response = await self._timed(T.QUERY_DASHBOARD, self.client.get(f"/seller/dashboard/{seller}"))
        if response is not None and response.is_success:
            self.ledger.dashboards += 1
            body = response.json()
            if not dashboard_consistent(body):
                self.anomalies += 1
                self.ledger.dashboard_anomalies.append(f"seller {seller}: {body['sellerView']}")

    async def _with_product(self, send: Callable[[tuple[int, int], _Known], Any]) -> None:
        """Run a seller update on a product no other worker is updating (the driver's lock)."""
        for _ in range(10):
            key = self._key()
            if not self.products[key].lock.locked():
                break
        known = self.products[key]
        async with known.lock:
            await send(key, known)

    async def price_update(self, tid: str) -> None:
        async def send(key: tuple[int, int], known: _Known) -> None:
            price = money(known.price * (100 + self.rng.randint(1, 9)) / 100)
            body = {
                "sellerId": known.row["seller_id"],
                "productId": known.row["product_id"],
                "price": str(price),
                "version": known.version,
                "instanceId": tid,
            }
            sent = time.monotonic()
            response = await self._timed(T.PRICE_UPDATE, self.client.patch("/product", json=body))
            if response is not None and response.is_success:
                known.price = price
                self.ledger.acknowledged(key, "price", known.version, price, sent, time.monotonic())

        await self._with_product(send)

    async def update_product(self, tid: str) -> None:
        async def send(key: tuple[int, int], known: _Known) -> None:
            body = {**known.row, "price": str(known.price), "version": tid}
            sent = time.monotonic()
            response = await self._timed(T.UPDATE_PRODUCT, self.client.put("/product", json=body))
            if response is not None and response.is_success:
                known.version = tid
                self.ledger.acknowledged(key, "replace", tid, known.price, sent, time.monotonic())

        await self._with_product(send)

    async def update_delivery(self, tid: str) -> None:
        await self._timed(T.UPDATE_DELIVERY, self.client.patch(f"/shipment/{tid}"))


def _zipf_weights(n: int, exponent: float) -> list[float]:
    """Cumulative weights of ranks 1..n under a zipfian law (cached: the hot path draws often)."""
    cached = _ZIPF.get((n, exponent))
    if cached is None:
        total, cached = 0.0, []
        for rank in range(1, n + 1):
            total += 1 / rank**exponent
            cached.append(total)
        _ZIPF[(n, exponent)] = cached
    return cached


_ZIPF: dict[tuple[int, float], list[float]] = {}


def dashboard_consistent(body: dict[str, Any]) -> bool:
    """Do the dashboard's totals equal the sums over its listed entries?"""
    view, entries = body["sellerView"], body["orderEntries"]
    if view["count_items"] != len(entries):
        return False
    if view["count_orders"] != len({(e["customer_id"], e["order_id"]) for e in entries}):
        return False
    return all(
        money(view[total]) == money(sum((Decimal(str(e[column])) for e in entries), Decimal(0)))
        for total, column in VIEW_TOTALS.items()
    )
