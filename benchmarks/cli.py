"""``vmsdb bench NAME``: the benchmarks as a subcommand of ``vmsdb``.

Registered in the ``vmsdb.commands`` entry-point group (see pyproject.toml), so the framework's
CLI finds it without importing it; the benchmarks themselves load only when the command runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["app"]

BENCHMARK_NAMES = ("handler", "delivery", "leases", "relay", "eshop", "isolation", "all")

app = typer.Typer(help="Measure vmsdb against hand-written baselines in the same run.")


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="handler, delivery, leases, relay, eshop, isolation or all")],
    seconds: Annotated[
        float | None, typer.Option(help="measuring time per benchmark (default: its own, 12-30 s)")
    ] = None,
    rounds: Annotated[int, typer.Option(help="alternating rounds per side; the best is reported")] = 2,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="results file (default benchmarks/results/<name>.json)")
    ] = None,
    mix: Annotated[str, typer.Option(help="eshop: paper (30/5/3/2/60) or vmodb (70/10/10/10)")] = "paper",
    distribution: Annotated[str, typer.Option(help="eshop: uniform or zipfian")] = "uniform",
    mode: Annotated[str, typer.Option(help="eshop: continuous or closed (CONTROL)")] = "continuous",
    items: Annotated[int, typer.Option(help="eshop: at most this many items per cart")] = 10,
    external: Annotated[
        bool, typer.Option(help="eshop: served in its own process(es), driven over HTTP from another")
    ] = False,
    clients: Annotated[str, typer.Option(help="eshop --external: client counts, e.g. 1,16")] = "1,16",
    workers: Annotated[int, typer.Option(help="eshop --external: server processes")] = 1,
) -> None:
    """Measure the framework against hand-written asyncpg baselines in the same run
    (what each compares: benchmarks/README.md). Exits 1 if the eShop's consistency verdict fails."""
    if name not in BENCHMARK_NAMES:
        raise typer.BadParameter(f"{name!r} is not a benchmark; choose one of {', '.join(BENCHMARK_NAMES)}")
    if rounds < 1 or (seconds is not None and seconds <= 0):
        raise typer.BadParameter("--rounds must be at least 1 and --seconds positive")
    try:  # lazy: pulls in every benchmark, and the broker and database helpers they need
        from vmsdb_bench.__main__ import main as run_benchmarks
        from vmsdb_bench.__main__ import parse_args
    except ModuleNotFoundError as err:
        typer.echo(
            f"vmsdb bench needs the bench extra ({err.name} is missing): pip install 'vmsdb[bench]'",
            err=True,
        )
        raise typer.Exit(1) from err

    argv = [name, "--rounds", str(rounds)]
    argv += ["--seconds", str(seconds)] if seconds is not None else []
    argv += ["--json", str(json_path)] if json_path is not None else []
    argv += ["--mix", mix, "--distribution", distribution, "--mode", mode, "--items", str(items)]
    argv += ["--clients", clients, "--workers", str(workers)]
    argv += ["--external"] if external else []
    try:
        args = parse_args(argv)
    except SystemExit as err:
        raise typer.BadParameter("see the error above") from err
    if not asyncio.run(run_benchmarks(args)):
        raise typer.Exit(1)  # the eShop's consistency verdict failed
