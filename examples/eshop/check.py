"""The eShop's consistency checks: a verdict that can say no.

The checks read one snapshot of every service's tables (as the administrator, read-only) and
judge it against what the driver saw (``Ledger``: when each product update was acknowledged,
when each checkout was sent, what each dashboard answered), never against the core's event
log, which is pruned. Every check counts what it examined; a check that examined nothing fails
("nothing to check"), so an empty database or a missing ledger cannot pass.

- **stock**: ``0 <= qty_reserved <= qty_available``, ``qty_free = qty_available - qty_reserved``,
  and ``initial = qty_available + sum of confirmed quantities`` (initial: what the driver seeded).
- **checkouts**: every issued checkout that succeeded has one order, one payment (and the
  provider charged it once), one shipment whose packages match its items; one not accepted has
  no paid order; order, payment and shipment statuses agree.
- **prices**: an order item's price is the one acknowledged before its checkout was sent, or a
  newer one of the same version.
- **replacements**: no item of a version replaced (acknowledged) before its checkout was sent.
- **causal replication** (the benchmark's anomaly check): in a cart, per seller, seeing product
  y's update means also seeing every update of x acknowledged before y's was sent.
- **seller entries**, **seller view** (each view row = the sums over the seller's in-progress
  entries) and the **live dashboards** answered during the mix.
- **customers**: payment and delivery counters match the orders and packages.
- **nothing dangling**: no lease, reservation or payment request left open.
- **dead letters**: none, unless the run injected them.
- **aborts**: only those the benchmark's semantics produce (a checkout not accepted by the cart,
  the stock or the payment); no errors, and price and product updates always succeed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from framework import App
from vmsdb_eshop.generator import Marketplace
from vmsdb_eshop.ledger import Ledger
from vmsdb_eshop.provider import SimulatedProvider
from vmsdb_eshop.schemas import (
    AFTER_SHIPMENT,
    OPEN_ORDER_STATUSES,
    PAID_ORDER_STATUSES,
    OrderStatus,
    TransactionType,
)
from vmsdb_eshop.services.seller import VIEW_TOTALS
from vmsdb_eshop.workload import WorkloadResult, dashboard_consistent

__all__ = [
    "CheckResult",
    "Evidence",
    "Verdict",
    "check",
    "dashboard_consistent",
    "evidence_of",
    "judge",
    "read_tables",
]

Row = dict[str, Any]
Db = dict[str, list[Row]]
Key = tuple[int, int]

_TABLES = {
    "stock": "SELECT * FROM stock.stock_items",
    "reservations": "SELECT * FROM stock.reservations",
    "orders": 'SELECT * FROM "order".orders',
    "order_items": 'SELECT * FROM "order".order_items',
    "payments": "SELECT * FROM payment.order_payments",
    "payment_requests": "SELECT customer_id, order_id, tid, status FROM payment.payment_requests",
    "shipments": "SELECT * FROM shipment.shipments",
    "packages": "SELECT * FROM shipment.packages",
    "entries": "SELECT * FROM seller.order_entries",
    "views": "SELECT * FROM seller.order_seller_view",
    "customers": "SELECT * FROM customer.customers",
    "history": "SELECT * FROM cart.cart_history",
    "cart_items": "SELECT * FROM cart.cart_items",
    "leases": "SELECT * FROM vms.leases WHERE service = 'stock' AND status = 'active' "
    "AND expires_at > vms.now()",
    "dead_letters": "SELECT id, subscriber, event_type, error FROM vms.dead_letters",
    "events": "SELECT count(*) AS n FROM vms.events",
}
_MAX_SHOWN = 5
#: Where a checkout may end NOT_ACCEPTED in the benchmark: the cart (empty, diverged or deleted
#: items), the stock (out of stock, replaced version) and the payment (declined).
_SEMANTIC_ABORTS = {(TransactionType.CUSTOMER_SESSION, f"409 {s}") for s in ("cart", "stock", "payment")}
#: Shipment status -> the order status it leaves.
_SHIPPED = {str(k): str(v) for k, v in AFTER_SHIPMENT.items()}


@dataclass
class CheckResult:
    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing violated, and something was examined."""
        return self.checked > 0 and not self.violations

    def expect(self, condition: bool, problem: str) -> None:
        self.checked += 1
        if not condition:
            self.violations.append(problem)

    def summary(self) -> str:
        if not self.checked and not self.violations:
            return "nothing to check"
        shown = "; ".join(self.violations[:_MAX_SHOWN])
        more = f" (+{len(self.violations) - _MAX_SHOWN} more)" if len(self.violations) > _MAX_SHOWN else ""
        if not self.violations:
            return f"{self.checked} checked, all hold"
        return f"{self.checked} checked, {len(self.violations)} violated: {shown}{more}"


@dataclass
class Verdict:
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]


@dataclass
class Evidence:
    """What the checks judge the database by, kept outside the system under test."""

    #: The driver's record; ``None`` (``vmsdb eshop check`` alone): those checks fail.
    ledger: Ledger | None = None
    #: Quantity ingested per (seller, product), as the driver seeded it.
    initial: Mapping[Key, int] | None = None
    #: The payment provider's own record of charges (the simulated provider's ``charges``).
    provider: SimulatedProvider | None = None
    #: The workload's counts (aborts by cause), when a workload ran.
    run: WorkloadResult | None = None
    #: Dead letters the run caused on purpose.
    injected_dead_letters: int = 0


def _group(rows: Iterable[Row], *key: str) -> dict[tuple[Any, ...], list[Row]]:
    grouped: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in key)].append(row)
    return grouped


def _lines(rows: Iterable[Row]) -> Counter[tuple[int, int, int]]:
    return Counter((r["seller_id"], r["product_id"], r["quantity"]) for r in rows)


#: What a check that judges by the driver's record reports without one.
NEEDS_LEDGER = "needs the driver's ledger (run it through the demo or the benchmark)"


def _needs_ledger(name: str) -> CheckResult:
    return CheckResult(name, 0, [NEEDS_LEDGER])


async def read_tables(conn: AsyncConnection) -> Db:
    """Every table the checks read, in ``conn``'s transaction."""
    return {
        name: [dict(r) for r in (await conn.execute(text(sql))).mappings()] for name, sql in _TABLES.items()
    }


async def _snapshot(app: App) -> Db:
    async with app.core.admin() as conn:
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        return await read_tables(conn)


def _paid_quantities(db: Db) -> Counter[Key]:
    paid = {(o["customer_id"], o["order_id"]) for o in db["orders"] if o["status"] in PAID_ORDER_STATUSES}
    sold: Counter[Key] = Counter()
    for i in db["order_items"]:
        if (i["customer_id"], i["order_id"]) in paid:
            sold[(i["seller_id"], i["product_id"])] += i["quantity"]
    return sold


def check_stock(db: Db, evidence: Evidence) -> CheckResult:
    result = CheckResult("stock: no oversell, conserved")
    sold = _paid_quantities(db)
    for s in db["stock"]:
        key = (s["seller_id"], s["product_id"])
        name = f"item {key[0]}/{key[1]}"
        available, reserved = s["qty_available"], s["qty_reserved"]
        result.expect(0 <= reserved <= available, f"{name}: reserved {reserved} of {available}")
        result.expect(
            s["qty_free"] == available - reserved, f"{name}: free {s['qty_free']} != {available} - {reserved}"
        )
        initial = (
            s["qty_initial"] if evidence.initial is None else evidence.initial.get(key, s["qty_initial"])
        )
        result.expect(
            initial == available + sold[key],
            f"{name}: {available} on hand + {sold[key]} sold != {initial} ingested",
        )
    return result


def _expected_shipment(status: str) -> str | None:
    """The shipment status an order status implies (``None``: no shipment)."""
    for shipment, order in _SHIPPED.items():
        if order == status:
            return shipment
    return None


def check_checkouts(db: Db, evidence: Evidence) -> CheckResult:
    """One order, payment, shipment per successful checkout; statuses agree."""
    result = CheckResult("checkouts: one order, payment, shipment")
    orders = _group(db["orders"], "customer_id", "tid")
    items = _group(db["order_items"], "customer_id", "order_id")
    payments = _group([p for p in db["payments"] if p["type"] != "VOUCHER"], "customer_id", "order_id")
    requests = _group(db["payment_requests"], "customer_id", "order_id")
    shipments = _group(db["shipments"], "customer_id", "order_id")
    packages = _group(db["packages"], "customer_id", "order_id")
    if evidence.ledger is None:
        issued = {key: "?" for key in orders}
    else:
        issued = {(c.customer_id, c.tid): c.status for c in evidence.ledger.checkouts}
        strays = [k for k in orders if k not in issued]
        result.expect(not strays, f"orders of no checkout the driver issued: {strays[:_MAX_SHOWN]}")
    for (customer, tid), answer in issued.items():
        found = orders.get((customer, tid), [])
        if answer == "SUCCESS" and len(found) != 1:
            result.expect(False, f"checkout {tid} of {customer} succeeded with {len(found)} orders")
            continue
        if len(found) > 1 or (
            answer != "?" and answer != "SUCCESS" and found and found[0]["status"] != "PAYMENT_FAILED"
        ):
            result.expect(
                False, f"checkout {tid} of {customer} ({answer}): orders {[o['status'] for o in found]}"
            )
            continue
        if not found:
            result.expect(True, "")
            continue
        order = found[0]
        key = (customer, order["order_id"])
        name = f"order {customer}/{order['order_id']} ({order['status']}, checkout {answer})"
        paid = order["status"] in PAID_ORDER_STATUSES
        want = "succeeded" if paid else "failed"
        result.expect(
            order["status"] in (*PAID_ORDER_STATUSES, OrderStatus.PAYMENT_FAILED), f"{name}: never settled"
        )
        if answer != "?":
            result.expect(paid == (answer == "SUCCESS"), f"{name}: answered {answer}")
        pay = [(p["status"], p["value"]) for p in payments.get(key, [])]
        result.expect(pay == [(want, order["total_invoice"])], f"{name}: payments {pay}")
        asked = [r["status"] for r in requests.get(key, [])]
        result.expect(asked == [want], f"{name}: payment requests {asked}")
        if evidence.provider is not None:
            charged = evidence.provider.charges.get(f"{customer}/{order['order_id']}", 0)
            result.expect(charged == (1 if paid else 0), f"{name}: the provider charged {charged} times")
        shipped = shipments.get(key, [])
        expected = _expected_shipment(order["status"])
        if paid:
            result.expect(
                len(shipped) == 1 and shipped[0]["status"] == expected,
                f"{name}: shipments {[s['status'] for s in shipped]}, expected one {expected}",
            )
            result.expect(
                _lines(packages.get(key, [])) == _lines(items.get(key, [])),
                f"{name}: packages {sorted(_lines(packages.get(key, [])))} != items",
            )
        else:
            result.expect(not shipped and not packages.get(key), f"{name}: shipped though not paid")
    return result


def _states_since(ledger: Ledger, key: Key, moment: float) -> list[Any]:
    states = ledger.products.get(key)
    if not states:
        return []
    return states[ledger.before(key, moment) :]


def _sold_items(db: Db, ledger: Ledger) -> list[tuple[Row, float, str]]:
    """Every order item with the moment its checkout was sent (from the ledger)."""
    sent = {(c.customer_id, c.tid): c.sent for c in ledger.checkouts}
    orders = {(o["customer_id"], o["order_id"]): o["tid"] for o in db["orders"]}
    found = []
    for item in db["order_items"]:
        tid = orders.get((item["customer_id"], item["order_id"]))
        moment = sent.get((item["customer_id"], tid)) if tid is not None else None
        if moment is not None and tid is not None:
            found.append((item, moment, tid))
    return found


def check_prices(db: Db, evidence: Evidence) -> CheckResult:
    """Each item is charged the price acknowledged before its checkout was sent, or a newer one."""
    name = "prices: acknowledged updates seen by later checkouts"
    if evidence.ledger is None:
        return _needs_ledger(name)
    result = CheckResult(name)
    for item, moment, tid in _sold_items(db, evidence.ledger):
        key = (item["seller_id"], item["product_id"])
        since = _states_since(evidence.ledger, key, moment)
        prices = {s.price for s in since if s.version == item["version"]}
        result.expect(
            item["unit_price"] in prices,
            f"checkout {tid}: {key[0]}/{key[1]} version {item['version']!r} charged {item['unit_price']}, "
            f"allowed {sorted(prices)}",
        )
    return result


def check_replacements(db: Db, evidence: Evidence) -> CheckResult:
    """No sold item carries a version replaced before its checkout was sent."""
    name = "replacements: replaced versions never sold"
    if evidence.ledger is None:
        return _needs_ledger(name)
    result = CheckResult(name)
    for item, moment, tid in _sold_items(db, evidence.ledger):
        key = (item["seller_id"], item["product_id"])
        versions = [s.version for s in _states_since(evidence.ledger, key, moment)]
        result.expect(
            item["version"] in versions,
            f"checkout {tid} sold {key[0]}/{key[1]} version {item['version']!r}, "
            f"replaced by {versions[:1]} before the checkout was sent",
        )
    return result


def check_causal(db: Db, evidence: Evidence) -> CheckResult:
    """The benchmark's replication anomaly: per seller, seeing y's update implies seeing every
    update of x acknowledged before y's was sent (price updates of the version the cart holds).

    Judged over what ``GET /cart/{customerId}/history/{tid}`` answered the driver (carts with two
    items of one seller) and the driver's own order of acknowledged updates.
    """
    name = "causal replication in carts"
    ledger = evidence.ledger
    if ledger is None:
        return _needs_ledger(name)
    result = CheckResult(name)
    for (customer, tid), cart in ledger.histories.items():
        seen: dict[Key, int] = {}
        for h in cart:
            key = (h["seller_id"], h["product_id"])
            states = ledger.products.get(key, [])
            price = Decimal(str(h["unit_price"]))
            matching = [i for i, s in enumerate(states) if (s.version, s.price) == (str(h["version"]), price)]
            result.expect(
                bool(matching),
                f"cart {customer}/{tid}: {key[0]}/{key[1]} at {price}, version {h['version']!r}: "
                "a state the driver never made",
            )
            if matching:
                seen[key] = matching[-1]
        for y, j in seen.items():
            y_sent = ledger.products[y][j].sent
            for x, i in seen.items():
                if x == y or x[0] != y[0]:
                    continue
                states = ledger.products[x]
                later = [s for s in states[i + 1 :] if s.version == states[i].version and s.kind == "price"]
                result.expect(
                    not later or later[0].acked >= y_sent,
                    f"cart {customer}/{tid}: saw {y[0]}/{y[1]} at {ledger.products[y][j].price} but "
                    f"{x[0]}/{x[1]} at {states[i].price}, updated before: "
                    f"{later[0].price if later else ''}",
                )
    return result


def check_entries(db: Db, evidence: Evidence) -> CheckResult:
    result = CheckResult("seller entries follow their orders")
    status = {(o["customer_id"], o["order_id"]): o["status"] for o in db["orders"]}
    entries = _group(db["entries"], "customer_id", "order_id", "seller_id", "product_id")
    for i in db["order_items"]:
        found = entries.get((i["customer_id"], i["order_id"], i["seller_id"], i["product_id"]), [])
        want = status[(i["customer_id"], i["order_id"])]
        result.expect(
            len(found) == 1
            and found[0]["order_status"] == want
            and found[0]["total_amount"] == i["total_amount"],
            f"order {i['customer_id']}/{i['order_id']} item {i['seller_id']}/{i['product_id']}: "
            f"entries {[e['order_status'] for e in found]}, order {want}",
        )
    if db["entries"] or db["order_items"]:
        result.expect(len(db["entries"]) == len(db["order_items"]), "entries without an order item")
    return result


def check_views(db: Db, evidence: Evidence) -> CheckResult:
    """Each seller's ``order_seller_view`` row equals the sums over its in-progress entries."""
    result = CheckResult("seller view = sums of in-progress entries")
    views = {v["seller_id"]: v for v in db["views"]}
    open_entries = _group([e for e in db["entries"] if e["order_status"] in OPEN_ORDER_STATUSES], "seller_id")
    for seller_id in sorted(set(views) | {k[0] for k in open_entries}):
        entries = open_entries.get((seller_id,), [])
        view = views.get(seller_id)
        body = {
            "sellerView": view
            or {"count_orders": 0, "count_items": 0, **dict.fromkeys(VIEW_TOTALS, Decimal(0))},
            "orderEntries": entries,
        }
        result.expect(
            dashboard_consistent(body), f"seller {seller_id}: view {view} != sums of {len(entries)} entries"
        )
    return result


def check_live_dashboards(db: Db, evidence: Evidence) -> CheckResult:
    """The dashboards answered during the mix, each checked as it arrived."""
    name = "live dashboards add up"
    if evidence.ledger is None:
        return _needs_ledger(name)
    result = CheckResult(name, evidence.ledger.dashboards, list(evidence.ledger.dashboard_anomalies))
    return result


def check_customers(db: Db, evidence: Evidence) -> CheckResult:
    result = CheckResult("customer counters match")
    paid = Counter(o["customer_id"] for o in db["orders"] if o["status"] in PAID_ORDER_STATUSES)
    failed = Counter(o["customer_id"] for o in db["orders"] if o["status"] == OrderStatus.PAYMENT_FAILED)
    delivered = Counter(p["customer_id"] for p in db["packages"] if p["status"] == "delivered")
    for c in db["customers"]:
        got = (c["success_payment_count"], c["failed_payment_count"], c["delivery_count"])
        want = (paid[c["id"]], failed[c["id"]], delivered[c["id"]])
        result.expect(got == want, f"customer {c['id']}: counters {got}, expected {want}")
    return result


def check_dangling(db: Db, evidence: Evidence) -> CheckResult:
    result = CheckResult("nothing dangling: leases, reservations, payments")
    held = {i["lease_id"] for i in db["cart_items"] if i["lease_id"] is not None}
    for lease in db["leases"]:
        result.expect(lease["id"] in held, f"lease {lease['id']} on {lease['key']} held by no cart item")
    for r in db["reservations"]:
        result.expect(
            r["status"] != "reserved", f"reservation {r['tid']} {r['seller_id']}/{r['product_id']} open"
        )
    for s in db["stock"]:
        result.expect(
            s["qty_reserved"] == 0, f"item {s['seller_id']}/{s['product_id']}: {s['qty_reserved']} reserved"
        )
    for p in db["payment_requests"]:
        result.expect(
            p["status"] != "pending", f"payment of order {p['customer_id']}/{p['order_id']} pending"
        )
    return result


def check_dead_letters(db: Db, evidence: Evidence) -> CheckResult:
    """No event dead-lettered, unless the run injected it.

    Examined: the run's transactions (each started a chain of events), or without a run the
    events still in the log, plus the dead letters themselves.
    """
    result = CheckResult("no dead letters")
    letters = db["dead_letters"]
    if evidence.run is not None:
        result.checked = sum(s.count for s in evidence.run.stats.values())
    else:
        result.checked = int(db["events"][0]["n"]) if db["events"] else 0
    result.checked += len(letters)
    if len(letters) != evidence.injected_dead_letters:
        shown = ", ".join(
            f"{d['event_type']} at {d['subscriber']}: {str(d['error'])[:80]}" for d in letters[:3]
        )
        result.violations.append(
            f"{len(letters)} dead letters ({evidence.injected_dead_letters} injected): {shown}"
        )
    return result


def check_aborts(db: Db, evidence: Evidence) -> CheckResult:
    """Aborts only where the benchmark's semantics put them."""
    name = "aborts within the benchmark's semantics"
    run = evidence.run
    if run is None:
        return _needs_ledger(name)
    result = CheckResult(name, sum(s.count for s in run.stats.values()))
    for (kind, cause), n in sorted(run.aborts.items()):
        if (kind, cause) not in _SEMANTIC_ABORTS:
            result.violations.append(f"{n} {kind} aborted: {cause}")
    return result


CHECKS: list[Callable[[Db, Evidence], CheckResult]] = [
    check_stock,
    check_checkouts,
    check_prices,
    check_replacements,
    check_causal,
    check_entries,
    check_views,
    check_live_dashboards,
    check_customers,
    check_dangling,
    check_dead_letters,
    check_aborts,
]


def judge(db: Db, evidence: Evidence) -> Verdict:
    """Every check over the tables ``db``."""
    return Verdict([run(db, evidence) for run in CHECKS])


def evidence_of(market: Marketplace, run: WorkloadResult | None = None, **more: Any) -> Evidence:
    """The evidence a driver that seeded ``market`` and ran ``run`` holds."""
    return Evidence(
        ledger=None if run is None else run.ledger,
        initial={(s.seller_id, s.product_id): s.qty_available for s in market.stock},
        run=run,
        **more,
    )


async def check(app: App, evidence: Evidence | None = None) -> Verdict:
    """Run every check on ``app``'s database (let every chain and payment finish first)."""
    return judge(await _snapshot(app), evidence or Evidence())
