"""``vmsdb eshop demo``: a small marketplace under the benchmark's mix, then the consistency check.

Starts an embedded Postgres in a temporary directory, registers the eight services and creates
their tables, seeds sellers, customers, products and stock, drives the transaction mix over the
HTTP API (in process) with concurrent clients, waits for every event chain to finish, prints a
summary and runs the consistency check on the live database.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from framework import App
from framework.dashboard import serving_dashboard
from framework.fastapi import run_lifespan
from vmsdb_eshop.app import create_api, create_app
from vmsdb_eshop.check import Evidence, Verdict, check, evidence_of
from vmsdb_eshop.generator import Marketplace, Scale, generate, load
from vmsdb_eshop.payments import settle_all
from vmsdb_eshop.provider import SimulatedProvider
from vmsdb_eshop.report import outcome_line, verdict_table, workload_table
from vmsdb_eshop.workload import Workload, WorkloadConfig, WorkloadResult

__all__ = ["DemoOptions", "MixRun", "drive_mix", "run_demo"]

_WATCH = "[bold]Watch it:[/] {} (dataflow with live rates; correlations: enter an instanceId)"
_WATCH_HOW = (
    "Watch it live: [bold]vmsdb eshop demo --dashboard[/]. A served eShop (vmsdb eshop serve) has its "
    "Prometheus metrics on /metrics; with VMSDB_DATABASE_URL set, [bold]vmsdb dashboard "
    "vmsdb_eshop.app:services[/] shows its core"
)

#: Quantities low enough that popular items sell out: out-of-stock checkouts show up too.
DEMO_SCALE = Scale(sellers=20, products_per_seller=10, customers=400, qty_per_product=30)


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 35.0
    concurrency: int = 8
    scale: Scale = DEMO_SCALE
    #: Where the embedded Postgres keeps its data; ``None``: a temporary directory.
    data_dir: Path | None = None
    #: A server to use instead (a fresh database must be given: the demo seeds it).
    database_url: str | None = None
    #: Serve the dashboard on this port of 127.0.0.1 while the mix runs.
    dashboard_port: int | None = None
    #: The mix and the driver's options (duration and concurrency are the fields above).
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    #: The simulated payment provider's latency per call.
    payment_latency: float = 0.003


async def _run_mix(app: App, options: DemoOptions, console: Console) -> tuple[Marketplace, MixRun]:
    market = generate(options.scale)
    with console.status("Seeding the marketplace..."):
        began = time.monotonic()
        await load(app, market)
    counts = ", ".join(f"{n} {name}" for name, n in market.counts().items())
    console.print(
        f"[green]Seeded[/] {counts}, {len(market.discounts)} discounts in {time.monotonic() - began:.1f} s"
    )
    config = replace(options.workload, duration=options.duration, concurrency=options.concurrency)
    progress = Progress(
        TextColumn("[bold]Transaction mix"),
        BarColumn(),
        TextColumn("{task.fields[done]} transactions"),
        TextColumn("{task.fields[tps]:.0f} TPS"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("mix", total=options.duration, done=0, tps=0.0)

        def advance(elapsed: float, done: int) -> None:
            progress.update(
                task,
                completed=min(elapsed, options.duration),
                done=done,
                tps=done / elapsed if elapsed else 0.0,
            )

        run = await drive_mix(app, market, config, advance, payment_latency=options.payment_latency)
        progress.update(task, completed=options.duration)
    return market, run


@dataclass
class MixRun:
    """A mix's results, and the payment provider's record of it."""

    result: WorkloadResult
    provider: SimulatedProvider
    #: Seconds the event chains and payments still running when the mix ended took to finish.
    drained: float

    def evidence(self, market: Marketplace) -> Evidence:
        return evidence_of(market, self.result, provider=self.provider)


async def drive_mix(
    app: App,
    market: Marketplace,
    config: WorkloadConfig,
    on_progress: Callable[[float, int], None] | None = None,
    *,
    payment_latency: float = 0.003,
) -> MixRun:
    """The mix against ``app``'s HTTP API, in process (httpx's ASGI transport), then every
    chain and payment finished; the simulated provider declines ``config.payment_failure_rate``."""
    provider = SimulatedProvider(
        latency=payment_latency, failure_rate=config.payment_failure_rate, seed=config.seed
    )
    api = create_api(app, provider=provider)
    async with run_lifespan(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://eshop", timeout=60) as client:
            result = await Workload(client, market, config).run(on_progress)
        began = time.monotonic()
        await settle_all(app)
        return MixRun(result, provider, time.monotonic() - began)


async def run_demo(options: DemoOptions = DemoOptions(), console: Console | None = None) -> Verdict:
    """Run the demo; returns the consistency verdict (printed too)."""
    console = console or Console()
    began = time.monotonic()
    console.rule("[bold]vmsdb eShop[/]: the Online Marketplace on virtual microservices")
    # The services log every retried conflict at INFO; the demo shows the totals instead.
    logging.getLogger("vmsdb").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="vmsdb-eshop-") as tmp:
        app = create_app(data_dir=options.data_dir or Path(tmp), database_url=options.database_url)
        with console.status("Starting Postgres, registering 8 services, creating tables..."):
            await app.start()
        console.print(
            f"[green]Started[/] {len(app.services)} services on one core in {time.monotonic() - began:.1f} s"
        )
        try:
            async with serving_dashboard(app, options.dashboard_port) as url:
                console.print(_WATCH.format(url) if url else _WATCH_HOW)
                market, run = await _run_mix(app, options, console)
            result = run.result
            console.print(workload_table(result))
            console.print(outcome_line(result))
            with console.status("Checking consistency on the live database..."):
                verdict = await check(app, run.evidence(market))
            console.print(verdict_table(verdict))
        finally:
            await app.stop()
    for error in result.errors[:5]:
        console.print(f"[yellow]error:[/] {error}")
    style = "bold green" if verdict.ok else "bold red"
    console.print(
        f"[{style}]{'All consistency checks hold' if verdict.ok else 'Consistency VIOLATED'}[/] "
        f"(demo took {time.monotonic() - began:.1f} s)"
    )
    return verdict
