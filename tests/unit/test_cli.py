"""The command line's surface: every command DESIGN.md names is there, and bad input is refused
with a message that names what was wrong (no database needed)."""

from __future__ import annotations

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
