"""The eShop's consistency checks, run on the live database once the workload has drained.

Each check reads one snapshot of every service's tables (as the administrator, read-only) and
the event log's commit order, and reports how many things it checked and what it found wrong:

- **stock**: no oversell (no negative quantity) and conservation per item:
  ``initial = available + reserved + sold``, with ``sold`` as the order service counts it.
- **checkouts**: every accepted checkout has exactly one order; a paid one exactly one payment
  and one shipment whose packages match its items; a failed payment has no shipment.
- **price updates**: a price update committed before a checkout is reflected in the prices it
  charged (the cart's ``precedence``).
- **replaced products**: no item of a replaced product version was reserved after the
  replacement committed.
- **seller entries** and **dashboards**: every order item has its seller entry, in the order's
  status; each dashboard's totals equal the sum of the entries it lists.
- **customers**: payment and delivery counters match the orders and packages.
- **leases**: no lease or reservation is left dangling.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from framework import App
from vmsdb_eshop.schemas import PAID_ORDER_STATUSES, OrderStatus
from vmsdb_eshop.services import Seller
from vmsdb_eshop.services.common import money
from vmsdb_eshop.services.seller import VIEW_TOTALS

__all__ = ["CheckResult", "Verdict", "check", "dashboard_consistent"]

Row = dict[str, Any]

_TABLES = {
    "stock": "SELECT * FROM stock.stock_items",
    "reservations": "SELECT * FROM stock.reservations",
    "orders": 'SELECT * FROM "order".orders',
    "order_items": 'SELECT * FROM "order".order_items',
    "payments": "SELECT * FROM payment.order_payments",
    "shipments": "SELECT * FROM shipment.shipments",
    "packages": "SELECT * FROM shipment.packages",
    "entries": "SELECT * FROM seller.order_entries",
    "customers": "SELECT * FROM customer.customers",
    "history": "SELECT * FROM cart.cart_history",
    "cart_items": "SELECT * FROM cart.cart_items",
    "leases": "SELECT * FROM vms.leases WHERE service = 'stock' AND status = 'active' "
    "AND expires_at > vms.now()",
    # The log in the order the core delivers it: (xid, position), see dbcore.eventlog.
    "log": "SELECT row_number() OVER (ORDER BY xid, position) AS seq, type, correlation_id, "
    "payload FROM vms.events WHERE type IN ('PriceUpdated', 'ProductUpdated', 'CheckoutRequest', "
    "'ReserveStock') ORDER BY seq",
}
_MAX_SHOWN = 5


@dataclass
class CheckResult:
    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def expect(self, condition: bool, problem: str) -> None:
        self.checked += 1
        if not condition:
            self.violations.append(problem)

    def summary(self) -> str:
        shown = "; ".join(self.violations[:_MAX_SHOWN])
        more = f" (+{len(self.violations) - _MAX_SHOWN} more)" if len(self.violations) > _MAX_SHOWN else ""
        return (
            f"{self.checked} checked, all hold"
            if self.ok
            else f"{len(self.violations)} violated: {shown}{more}"
        )


@dataclass
class Verdict:
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def _group(rows: Iterable[Row], *key: str) -> dict[tuple[Any, ...], list[Row]]:
    grouped: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in key)].append(row)
    return grouped


def _lines(rows: Iterable[Row]) -> Counter[tuple[int, int, int]]:
    return Counter((r["seller_id"], r["product_id"], r["quantity"]) for r in rows)


async def _snapshot(app: App) -> dict[str, list[Row]]:
    async with app.core.admin() as conn:
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        return {
            name: [dict(r) for r in (await conn.execute(text(sql))).mappings()]
            for name, sql in _TABLES.items()
        }


def check_stock(db: dict[str, list[Row]]) -> CheckResult:
    result = CheckResult("no oversell, stock conserved")
    paid = {(o["customer_id"], o["order_id"]) for o in db["orders"] if o["status"] in PAID_ORDER_STATUSES}
    sold: Counter[tuple[int, int]] = Counter()
    for i in db["order_items"]:
        if (i["customer_id"], i["order_id"]) in paid:
            sold[(i["seller_id"], i["product_id"])] += i["quantity"]
    for s in db["stock"]:
        key = (s["seller_id"], s["product_id"])
        name = f"item {key[0]}/{key[1]}"
        result.expect(s["qty_available"] >= 0 and s["qty_reserved"] >= 0, f"{name} oversold: {s}")
        total = s["qty_available"] + s["qty_reserved"] + s["ytd"]
        result.expect(
            total == s["qty_initial"], f"{name}: {total} accounted for, {s['qty_initial']} ingested"
        )
        result.expect(s["ytd"] == sold[key], f"{name}: stock sold {s['ytd']}, orders paid for {sold[key]}")
    return result


def check_checkouts(db: dict[str, list[Row]]) -> CheckResult:
    result = CheckResult("one order, payment, shipment per checkout")
    orders = _group(db["orders"], "customer_id", "tid")
    items = _group(db["order_items"], "customer_id", "order_id")
    payments = _group([p for p in db["payments"] if p["type"] != "VOUCHER"], "customer_id", "order_id")
    shipments = _group(db["shipments"], "customer_id", "order_id")
    packages = _group(db["packages"], "customer_id", "order_id")
    accepted = _group(db["reservations"], "customer_id", "tid")
    for (customer, tid), held in accepted.items():
        found = orders.get((customer, tid), [])
        result.expect(len(found) == 1, f"checkout {tid} of {customer} has {len(found)} orders")
        if len(found) != 1:
            continue
        order = found[0]
        key = (customer, order["order_id"])
        paid = order["status"] in PAID_ORDER_STATUSES
        outcome = ("confirmed", "succeeded") if paid else ("cancelled", "failed")
        result.expect(_lines(items[key]) == _lines(held), f"order {key}: items differ from the reservation")
        result.expect(
            {r["status"] for r in held} == {outcome[0]},
            f"order {key} ({order['status']}): reservations {sorted({r['status'] for r in held})}",
        )
        pay = [(p["status"], p["value"]) for p in payments.get(key, [])]
        result.expect(pay == [(outcome[1], order["total_invoice"])], f"order {key}: payments {pay}")
        shipped = shipments.get(key, [])
        ship_ok = (len(shipped) == 1 and _lines(packages[key]) == _lines(items[key])) if paid else not shipped
        result.expect(
            ship_ok, f"order {key} ({order['status']}): {len(shipped)} shipments or packages differ"
        )
    strays = [k for k in orders if k not in accepted]
    result.expect(not strays, f"orders without a stock reservation: {strays[:_MAX_SHOWN]}")
    return result


@dataclass(frozen=True)
class _State:
    """A product as one committed change left it: its revision orders the changes."""

    revision: int
    version: str
    price: Decimal
    seq: int  # where the change's event sits in the log


def _product_states(log: list[Row]) -> dict[tuple[int, int], list[_State]]:
    """Per product, every committed state, by revision.

    Log order is not revision order: two concurrent updates of one product take their
    transaction ids before they queue for the row, so the second to commit may sort first. A
    PriceUpdated whose revision is already known changed nothing (its version did not match).
    """
    states: dict[tuple[int, int], dict[int, _State]] = defaultdict(dict)
    for e in log:
        p = e["payload"]
        if e["type"] not in ("ProductUpdated", "PriceUpdated"):
            continue
        known = states[(p["seller_id"], p["product_id"])]
        if e["type"] == "ProductUpdated":
            product = p["product"]
            known[p["revision"]] = _State(
                p["revision"], product["version"], Decimal(str(product["price"])), e["seq"]
            )
        elif p["revision"] not in known:
            known[p["revision"]] = _State(p["revision"], p["version"], Decimal(str(p["price"])), e["seq"])
    return {
        key: sorted(by_revision.values(), key=lambda s: s.revision) for key, by_revision in states.items()
    }


def _since(states: list[_State], seq: int | None) -> list[_State]:
    """The state committed before log position ``seq`` (the newest one), and every newer one."""
    before = [s.revision for s in states if seq is not None and s.seq < seq]
    return [s for s in states if s.revision >= max(before)] if before else []


def _positions(log: list[Row], kind: str) -> dict[tuple[int, str], int]:
    return {(e["payload"]["customer_id"], e["correlation_id"]): e["seq"] for e in log if e["type"] == kind}


def check_prices(db: dict[str, list[Row]]) -> CheckResult:
    """The price charged is the one committed before the checkout, or a newer one: never older."""
    result = CheckResult("price updates seen by later checkouts")
    states = _product_states(db["log"])
    checkouts = _positions(db["log"], "CheckoutRequest")
    for item in db["history"]:
        seq = checkouts.get((item["customer_id"], item["tid"]))
        since = _since(states.get((item["seller_id"], item["product_id"]), []), seq)
        if not since or since[0].version != item["version"]:
            continue  # no known product state, or a replaced version (the stock refuses it)
        prices = [s.price for s in since if s.version == item["version"]]
        result.expect(
            item["unit_price"] in prices,
            f"checkout {item['tid']}: {item['seller_id']}/{item['product_id']} charged "
            f"{item['unit_price']}, price committed before it was {prices[0]}",
        )
    return result


def check_replacements(db: dict[str, list[Row]]) -> CheckResult:
    """A reserved item's version is the one committed before the reservation request, or newer."""
    result = CheckResult("replaced versions never sold")
    states = _product_states(db["log"])
    requests = _positions(db["log"], "ReserveStock")
    for r in db["reservations"]:
        seq = requests.get((r["customer_id"], r["tid"]))
        since = _since(states.get((r["seller_id"], r["product_id"]), []), seq)
        versions = [s.version for s in since] or [r["version"]]
        result.expect(
            r["version"] in versions,
            f"checkout {r['tid']} reserved {r['seller_id']}/{r['product_id']} version "
            f"{r['version']!r} after version {versions[0]!r} replaced it",
        )
    return result


def check_entries(db: dict[str, list[Row]]) -> CheckResult:
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
    result.expect(len(db["entries"]) == len(db["order_items"]), "entries without an order item")
    return result


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


async def check_dashboards(app: App, sellers: Iterable[int]) -> CheckResult:
    result = CheckResult("dashboard totals = sum of entries")
    for seller_id in sorted(set(sellers)):
        body = await app.service(Seller).dashboard(seller_id)
        consistent = dashboard_consistent(body)
        result.expect(consistent, f"seller {seller_id}: totals {body['sellerView']} do not add up")
    return result


def check_customers(db: dict[str, list[Row]]) -> CheckResult:
    result = CheckResult("customer counters match")
    paid = Counter(o["customer_id"] for o in db["orders"] if o["status"] in PAID_ORDER_STATUSES)
    failed = Counter(o["customer_id"] for o in db["orders"] if o["status"] == OrderStatus.PAYMENT_FAILED)
    delivered = Counter(p["customer_id"] for p in db["packages"] if p["status"] == "delivered")
    for c in db["customers"]:
        got = (c["success_payment_count"], c["failed_payment_count"], c["delivery_count"])
        want = (paid[c["id"]], failed[c["id"]], delivered[c["id"]])
        result.expect(got == want, f"customer {c['id']}: counters {got}, expected {want}")
    return result


def check_leases(db: dict[str, list[Row]]) -> CheckResult:
    result = CheckResult("no dangling leases or reservations")
    held = {i["lease_id"] for i in db["cart_items"] if i["lease_id"] is not None}
    for lease in db["leases"]:
        result.expect(lease["id"] in held, f"lease {lease['id']} on {lease['key']} held by no cart item")
    for r in db["reservations"]:
        result.expect(r["status"] != "reserved", f"reservation {r['tid']} {r['seller_id']}/{r['product_id']}")
    return result


async def check(app: App) -> Verdict:
    """Run every check on ``app``'s database (drain the workload first)."""
    db = await _snapshot(app)
    results = [
        check(db)
        for check in (
            check_stock,
            check_checkouts,
            check_prices,
            check_replacements,
            check_entries,
            check_customers,
            check_leases,
        )
    ]
    results.insert(5, await check_dashboards(app, (e["seller_id"] for e in db["entries"])))
    return Verdict(results)
