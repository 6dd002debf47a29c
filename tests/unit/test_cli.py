"""The command line's surface: every command DESIGN.md names is there, and bad input is refused
with a message that names what was wrong (no database needed)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import pytest
from typer.testing import CliRunner

from dbcore.errors import IsolationError
from framework import App
from framework.cli import cli, main

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


REFUSAL = IsolationError("cart", "stock", "stock.stock_items", "write")


def refuse(*args: object, **kwargs: object) -> NoReturn:
    raise REFUSAL


async def refuse_later(*args: object, **kwargs: object) -> NoReturn:
    raise REFUSAL


@contextlib.asynccontextmanager
async def refusing_connection(*args: object, **kwargs: object) -> AsyncIterator[NoReturn]:
    """Stands in for ``framework._internal.host.connected``: connecting is refused by the core."""
    raise REFUSAL
    yield  # an async generator, as the real one is


@pytest.mark.parametrize(
    ("argv", "patch"),
    [
        # a core error inside the command's async work, in each module of subcommands
        (["leases", "shop:app"], ("framework.cli._commands.load_app", refuse)),
        (["migrate", "up"], ("framework.migrations.migrate", refuse_later)),
        (
            ["integrity", "check", "--app", "shop:app"],
            ("framework.cli._integrity.connected", refusing_connection),
        ),
        # and one raised before any async work starts
        (["services", "shop:app"], ("framework.cli._commands.load_app", refuse)),
    ],
)
def test_a_core_error_inside_a_command_is_one_line_and_exit_code_1(
    argv: list[str],
    patch: tuple[str, object],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(*patch)
    monkeypatch.setattr(
        "framework.cli._integrity.load_app", lambda target: App([], database_url="postgresql://x/y")
    )
    monkeypatch.delenv("VMSDB_APP", raising=False)
    monkeypatch.setattr(sys, "argv", ["vmsdb", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"error: {REFUSAL}"]  # one line, however long, and no traceback
    assert out == ""
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


def test_restore_of_a_backup_id_that_is_not_a_uuid_is_one_line_and_touches_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_database(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("the id is checked before the database is reached")

    monkeypatch.setattr("framework.cli._integrity._run", no_database)
    monkeypatch.setattr(sys, "argv", ["vmsdb", "restore", "cart", "--backup", "999", "--app", "shop:app"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "'999' is not a backup id" in err, err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectionRefusedError(111, "Connect call failed"), "start the database"),
        (FileNotFoundError(2, "No such file or directory"), "start the database"),
    ],
)
def test_a_database_that_cannot_be_reached_is_one_line(
    error: OSError, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def unreachable(*args: object, **kwargs: object) -> NoReturn:
        raise error

    monkeypatch.setattr("framework.cli._commands.load_app", lambda target: App([]))
    monkeypatch.setattr(App, "start", unreachable)
    monkeypatch.setattr(sys, "argv", ["vmsdb", "dead-letters", "list", "shop:app"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and expected in err and "unavailable" in err, err
