"""``vmsdb eshop ...``: run the demo, serve the HTTP API, seed a marketplace, check consistency,
play a disaster (backup, crash, restore, amnesia report).

Mounted by ``vmsdb`` as its ``eshop`` group; runnable alone as ``python -m vmsdb_eshop.cli``.
``serve``, ``seed`` and ``check`` use the database of ``VMSDB_DATABASE_URL`` (absent: the
embedded Postgres in ``VMSDB_DATA_DIR``, default ``./.vmsdb``), so they work on the same data.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from fastapi import FastAPI
from rich.console import Console

from framework.cli import print_report, shared_core
from vmsdb_eshop.app import create_api, create_app, default_provider
from vmsdb_eshop.check import check as run_check
from vmsdb_eshop.demo import DEMO_SCALE, DemoOptions, run_demo
from vmsdb_eshop.disaster import DisasterOptions, run_disaster, summary
from vmsdb_eshop.generator import Scale, generate, load
from vmsdb_eshop.payments import payment_processor, settle_all
from vmsdb_eshop.report import verdict_table
from vmsdb_eshop.workload import MIXES, WorkloadConfig

__all__ = ["app", "workload_config"]

app = typer.Typer(
    help="The eShop sample: the Online Marketplace benchmark's eight services.", no_args_is_help=True
)
console = Console()


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="seconds of transaction mix")] = 35.0,
    concurrency: Annotated[int, typer.Option(help="concurrent clients")] = 8,
    customers: Annotated[int, typer.Option(help="customers to seed")] = DEMO_SCALE.customers,
    sellers: Annotated[int, typer.Option(help="sellers to seed")] = DEMO_SCALE.sellers,
    stock: Annotated[int, typer.Option(help="units in stock per product")] = DEMO_SCALE.qty_per_product,
    data_dir: Annotated[Path | None, typer.Option(help="keep the database here (default: temporary)")] = None,
    dashboard: Annotated[bool, typer.Option(help="serve the dashboard while the mix runs")] = False,
    dashboard_port: Annotated[int, typer.Option(help="the dashboard's port on 127.0.0.1")] = 8600,
    mix: Annotated[str, typer.Option(help="paper (30/5/3/2/60) or vmodb (70/10/10/10)")] = "paper",
    distribution: Annotated[str, typer.Option(help="uniform or zipfian sellers and products")] = "uniform",
    mode: Annotated[str, typer.Option(help="continuous or closed (the driver's CONTROL)")] = "continuous",
    items: Annotated[int, typer.Option(help="at most this many items per cart (1..10)")] = 10,
    payment_failures: Annotated[float, typer.Option(help="share of payments the provider declines")] = 0.03,
    payment_latency_ms: Annotated[float, typer.Option(help="the payment provider's latency")] = 3.0,
) -> None:
    """Embedded Postgres, 8 services, a seeded marketplace, the benchmark's mix, the check.

    Exits 1 on any violation (including live dashboard anomalies and unexpected aborts).
    """
    scale = Scale(
        sellers=sellers,
        products_per_seller=DEMO_SCALE.products_per_seller,
        customers=customers,
        qty_per_product=stock,
    )
    options = DemoOptions(
        duration=duration,
        concurrency=concurrency,
        scale=scale,
        data_dir=data_dir,
        dashboard_port=dashboard_port if dashboard else None,
        workload=workload_config(mix, distribution, mode, items, payment_failures),
        payment_latency=payment_latency_ms / 1000,
    )
    verdict = asyncio.run(run_demo(options, console))
    raise typer.Exit(0 if verdict.ok else 1)


def workload_config(
    mix: str, distribution: str, mode: str, items: int, payment_failures: float = 0.03
) -> WorkloadConfig:
    """The driver's options from the command line (``typer.BadParameter`` if one is wrong)."""
    if mix not in MIXES:
        raise typer.BadParameter(f"--mix is one of {', '.join(MIXES)}, not {mix!r}")
    try:
        return WorkloadConfig(
            mix=MIXES[mix],
            distribution=distribution,
            mode=mode,
            max_items=items,
            payment_failure_rate=payment_failures,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1")] = 8000,
    service: Annotated[str | None, typer.Option(help="serve only this service's routes")] = None,
    workers: Annotated[
        int, typer.Option(help="processes sharing the core (deliveries shard through SKIP LOCKED)")
    ] = 1,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs) on 127.0.0.1."""
    import uvicorn

    if workers < 1:
        raise typer.BadParameter("at least 1", param_hint="--workers")
    try:
        api = create_api(only=None if service is None else [service])
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--service") from err
    if workers == 1:
        uvicorn.run(api, host="127.0.0.1", port=port)
        return
    # N processes, each its own App on the same core: start the embedded server and migrate
    # once here, so the workers neither race to start it nor to migrate.
    with shared_core() as url:
        os.environ["VMSDB_DATABASE_URL"] = url
        os.environ[_ONLY] = service or ""
        os.environ["VMSDB_PROCESSES"] = str(workers)  # each sizes its pools to its share

        async def migrate_once() -> None:
            async with create_app(database_url=url, workers=False):
                pass

        asyncio.run(migrate_once())
        factory = f"{__name__}:{_served_api.__name__}"
        uvicorn.run(factory, factory=True, host="127.0.0.1", port=port, workers=workers)


_ONLY = "VMSDB_ESHOP_SERVE_ONLY"


def _served_api() -> FastAPI:
    """The API of one of ``serve --workers N``'s processes (uvicorn imports it by name)."""
    only = os.environ.get(_ONLY)
    return create_api(only=[only] if only else None)


@app.command()
def seed(
    sellers: Annotated[int, typer.Option()] = 10,
    products_per_seller: Annotated[int, typer.Option()] = 10,
    customers: Annotated[int, typer.Option()] = 100,
    stock: Annotated[int, typer.Option(help="units in stock per product")] = 10_000,
) -> None:
    """Load a generated marketplace into the database (as the benchmark's ingestion would)."""
    market = generate(
        Scale(
            sellers=sellers,
            products_per_seller=products_per_seller,
            customers=customers,
            qty_per_product=stock,
        )
    )

    async def go() -> None:
        async with create_app() as started:
            await load(started, market)

    asyncio.run(go())
    console.print(f"seeded {market.counts()}")


@app.command()
def check() -> None:
    """Finish the pending event chains and payments, then run the consistency checks.

    Without the driver's ledger, the checks that judge by it fail (they examined nothing), as
    does any check on an empty database: exit 1.
    """

    async def go() -> bool:
        async with create_app() as started, payment_processor(started, default_provider()):
            await settle_all(started, timeout=60)
            verdict = await run_check(started)
        console.print(verdict_table(verdict))
        return verdict.ok

    raise typer.Exit(0 if asyncio.run(go()) else 1)


@app.command()
def disaster(
    service: Annotated[str, typer.Option(help="the service to lose and restore")] = "customer",
    mode: Annotated[str, typer.Option(help="availability or consistency")] = "availability",
    duration: Annotated[float, typer.Option(help="seconds of workload after the backup")] = 4.0,
    timeout: Annotated[float, typer.Option(help="consistency: seconds to wait for answers")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Back up SERVICE, run a workload, crash it, restore it, print the amnesia report (G10).

    Exit 1 unless the references are at least weakly consistent (Definition 3).
    """
    if mode not in ("availability", "consistency"):
        raise typer.BadParameter("--mode is availability or consistency")
    options = DisasterOptions(
        service=service,
        mode="consistency" if mode == "consistency" else "availability",
        duration=duration,
        timeout=timeout,
    )
    try:
        result = asyncio.run(run_disaster(options, Console(stderr=True)))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--service") from err
    if as_json:
        print(json.dumps(result.to_json(), indent=2, default=str))
    else:
        console.print(summary(result))
        print_report(result.report, as_json=False)
    raise typer.Exit(0 if result.report.weakly_consistent else 1)


if __name__ == "__main__":
    app()
