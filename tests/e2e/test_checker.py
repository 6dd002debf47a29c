"""The consistency checker finds what it is meant to find: each check against a broken state.

The checks are pure functions over a snapshot of the tables and the log, so a consistent
snapshot is written out here and then broken one way at a time (no database needed).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from vmsdb_eshop import check

Db = dict[str, list[dict[str, Any]]]
D = Decimal


def _event(seq: int, kind: str, correlation: str | None, **payload: Any) -> dict[str, Any]:
    return {"seq": seq, "type": kind, "correlation_id": correlation, "payload": payload}


def consistent() -> Db:
    """Product 1/1 (price 10), raised to 11, then customer 7 buys 2 at 11 in checkout t1."""
    key = {"customer_id": 7, "order_id": 1}
    line = {"seller_id": 1, "product_id": 1, "quantity": 2}
    return {
        "stock": [{**line, "qty_available": 8, "qty_reserved": 0, "ytd": 2, "qty_initial": 10}],
        "reservations": [{**line, "customer_id": 7, "tid": "t1", "version": "0", "status": "confirmed"}],
        "orders": [{**key, "tid": "t1", "status": "READY_FOR_SHIPMENT", "total_invoice": D("23.00")}],
        "order_items": [{**key, **line, "total_amount": D("22.00")}],
        "payments": [{**key, "type": "BOLETO", "status": "succeeded", "value": D("23.00")}],
        "shipments": [{**key, "package_count": 1}],
        "packages": [{**key, **line, "status": "shipped"}],
        "entries": [{**key, **line, "order_status": "READY_FOR_SHIPMENT", "total_amount": D("22.00")}],
        "customers": [{"id": 7, "success_payment_count": 1, "failed_payment_count": 0, "delivery_count": 0}],
        "history": [{**line, "customer_id": 7, "tid": "t1", "version": "0", "unit_price": D("11.00")}],
        "cart_items": [],
        "leases": [],
        "log": [
            _event(
                1,
                "ProductUpdated",
                None,
                seller_id=1,
                product_id=1,
                revision=1,
                product={"version": "0", "price": "10.00"},
            ),
            _event(
                2, "PriceUpdated", "p1", seller_id=1, product_id=1, revision=2, version="0", price="11.00"
            ),
            _event(3, "CheckoutRequest", "t1", customer_id=7),
            _event(4, "ReserveStock", "t1", customer_id=7),
        ],
    }


def _oversold(db: Db) -> None:
    db["stock"][0].update(qty_available=-1, ytd=11)


def _lost_units(db: Db) -> None:
    db["stock"][0]["qty_available"] = 7


def _second_order(db: Db) -> None:
    db["orders"].append({**db["orders"][0], "order_id": 2})


def _no_shipment(db: Db) -> None:
    db["shipments"].clear()


def _stale_price(db: Db) -> None:
    db["history"][0]["unit_price"] = D("10.00")


def _old_version_sold(db: Db) -> None:
    db["log"].insert(
        2,
        _event(
            2,
            "ProductUpdated",
            "v9",
            seller_id=1,
            product_id=1,
            revision=3,
            product={"version": "v9", "price": "11.00"},
        ),
    )
    for n, e in enumerate(db["log"], start=1):
        e["seq"] = n


def _entry_behind(db: Db) -> None:
    db["entries"][0]["order_status"] = "INVOICED"


def _counter_off(db: Db) -> None:
    db["customers"][0]["success_payment_count"] = 2


def _dangling_lease(db: Db) -> None:
    db["leases"].append({"id": "L1", "key": {"seller_id": 1, "product_id": 1}})


Check = Callable[[Db], check.CheckResult]
CASES: list[tuple[str, Callable[[Db], None], Check]] = [
    ("oversold", _oversold, check.check_stock),
    ("lost units", _lost_units, check.check_stock),
    ("two orders", _second_order, check.check_checkouts),
    ("no shipment", _no_shipment, check.check_checkouts),
    ("stale price", _stale_price, check.check_prices),
    ("replaced version sold", _old_version_sold, check.check_replacements),
    ("entry behind", _entry_behind, check.check_entries),
    ("counter off", _counter_off, check.check_customers),
    ("dangling lease", _dangling_lease, check.check_leases),
]


def test_a_consistent_snapshot_passes_every_check() -> None:
    for _name, _break, run in CASES:
        result = run(consistent())
        assert result.ok and result.checked > 0, (result.name, result.violations)


@pytest.mark.parametrize(("name", "breaks", "run"), CASES, ids=[c[0] for c in CASES])
def test_each_check_finds_its_violation(name: str, breaks: Callable[[Db], None], run: Check) -> None:
    db = copy.deepcopy(consistent())
    breaks(db)
    result = run(db)
    assert not result.ok, f"{result.name} missed: {name}"
    assert "violated" in result.summary()
