"""The command line's surface: every command DESIGN.md names is there, and bad input is refused
with a message that names what was wrong (no database needed)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from framework.cli import cli

runner = CliRunner()


def text_of(output: str) -> str:
    """The output without rich's box and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def test_the_commands_design_names_are_all_there() -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in (
        "services",
        "migrate",
        "eshop",
        "dead-letters",
        "integrity",
        "backup",
        "restore",
        "bench",
    ):
        assert command in result.output, command


def test_bench_refuses_an_unknown_benchmark_by_name() -> None:
    result = runner.invoke(cli, ["bench", "nope"])
    assert result.exit_code == 2
    assert "'nope' is not a benchmark; choose one of handler, delivery, leases, relay, eshop, all" in text_of(
        result.output
    )


def test_bench_refuses_nonsense_budgets() -> None:
    result = runner.invoke(cli, ["bench", "leases", "--rounds", "0"])
    assert result.exit_code == 2
    assert "--rounds must be at least 1" in text_of(result.output)


def test_services_json_shows_each_services_references() -> None:
    result = runner.invoke(cli, ["services", "vmsdb_eshop.services:SERVICES", "--json"])
    assert result.exit_code == 0, result.output
    by_name = {d["name"]: d for d in json.loads(result.output)}
    assert by_name["product"]["referenceable"] == [
        {"table": "products", "entity": "ProductRecord", "key": ["seller_id", "product_id"]}
    ]
    assert by_name["customer"]["referenceable"] == [
        {"table": "customers", "entity": "CustomerRecord", "key": ["id"]}
    ]
    holds = {
        (c["table"], c["column"]): (c["target_service"], c["target_table"])
        for c in by_name["order"]["reference_columns"]
    }
    assert holds == {
        ("orders", "customer"): ("customer", "customers"),
        ("order_items", "product"): ("product", "products"),
    }
    assert by_name["cart"]["referenceable"] == by_name["cart"]["reference_columns"] == []


def test_services_table_shows_each_services_references(tmp_path: Path) -> None:
    result = runner.invoke(
        cli,
        ["services", "vmsdb_eshop.services:SERVICES", "--graph", str(tmp_path / "flow")],
        env={"COLUMNS": "400"},
    )
    assert result.exit_code == 0, result.output
    shown = text_of(result.output)
    assert "references" in shown
    assert "products (seller_id, product_id) referenceable" in shown
    assert "orders.customer → customer.customers" in shown
