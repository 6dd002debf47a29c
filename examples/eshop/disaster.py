"""``vmsdb eshop disaster``: back up a service, keep working, lose it, restore it, report the amnesia.

On a fresh embedded Postgres (in a temporary directory): seed a small marketplace, back up one
service (default: customer), run a short workload (checkouts create orders that reference their
customer and products, with cached copies; some customers are also edited, so the backup is
stale), wait for every event chain, crash the service (its schema is dropped), restore it from
the backup in ``availability`` or ``consistency`` mode, and check Definitions 1 and 3: which
references broke, which fall in amnesia intervals, and what needs manual repair.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from dbcore.backup import BackupInfo
from dbcore.integrity import IntegrityReport
from dbcore.recovery import Mode, RecoveryState
from framework import references
from framework.fastapi import run_lifespan
from vmsdb_eshop.app import create_api, create_app
from vmsdb_eshop.generator import Scale, generate, load
from vmsdb_eshop.services.customer import Customer
from vmsdb_eshop.workload import Mix, Workload, WorkloadConfig, WorkloadResult

__all__ = ["DISASTER_SCALE", "DisasterOptions", "DisasterResult", "run_disaster"]

DISASTER_SCALE = Scale(sellers=5, products_per_seller=5, customers=60, qty_per_product=1000)

#: Mostly checkouts (they create the orders that reference customers and products).
DISASTER_MIX = Mix(
    customer_session=70, query_dashboard=0, price_update=5, update_product=5, update_delivery=20
)


@dataclass(frozen=True)
class DisasterOptions:
    service: str = "customer"
    mode: Mode = "availability"
    #: Seconds of workload between the backup and the crash.
    duration: float = 4.0
    concurrency: int = 4
    scale: Scale = DISASTER_SCALE
    #: Customers edited after the backup (new names: what the backup will not know).
    edits: int = 10
    #: consistency mode: seconds to wait for the holders' answers.
    timeout: float = 10.0
    data_dir: Path | None = None
    database_url: str | None = None


@dataclass
class DisasterResult:
    backup: BackupInfo
    workload: WorkloadResult
    recovery: RecoveryState
    report: IntegrityReport
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "backup": dataclasses.asdict(self.backup),
            "workload": {
                "completed": self.workload.completed,
                "errors": len(self.workload.errors),
            },
            "recovery": {**dataclasses.asdict(self.recovery), "waiting_for": self.recovery.waiting_for},
            "report": self.report.to_json(),
            "seconds": round(self.seconds, 2),
        }


async def _edit_customers(app: Any, market: Any, count: int, seed: int = 11) -> None:
    """Rename ``count`` customers (through the service: each edit is a new version of the entity)."""
    rng = random.Random(seed)
    chosen = rng.sample(market.customers, min(count, len(market.customers)))
    edited = [c.model_copy(update={"last_name": f"{c.last_name} (edited)"}) for c in chosen]
    if edited:
        await app.service(Customer).ingest(edited)


async def run_disaster(
    options: DisasterOptions = DisasterOptions(), console: Console | None = None
) -> DisasterResult:
    """Run the scenario; ``console`` gets the progress lines (the caller prints the report)."""
    console = console or Console(stderr=True)
    began = time.monotonic()
    logging.getLogger("vmsdb").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="vmsdb-disaster-") as tmp:
        app = create_app(data_dir=options.data_dir or Path(tmp), database_url=options.database_url)
        if options.service not in {s.service_name() for s in app.services}:
            raise ValueError(f"unknown service {options.service!r}")
        await app.start()
        try:
            market = generate(options.scale)
            await load(app, market)
            console.print(f"[green]Seeded[/] {market.counts()}")
            info = await references.backup(app, options.service, Path(tmp) / "backups")
            console.print(
                f"[green]Backed up[/] {info.service} (t_backup {info.t_backup}, {info.entities} entities)"
            )
            await _edit_customers(app, market, options.edits // 2)
            api = create_api(app)
            config = WorkloadConfig(
                duration=options.duration, concurrency=options.concurrency, mix=DISASTER_MIX
            )
            async with run_lifespan(api):
                transport = httpx.ASGITransport(app=api)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://eshop", timeout=60
                ) as client:
                    result = await Workload(client, market, config).run()
            await _edit_customers(app, market, options.edits - options.edits // 2, seed=12)
            await app.drain(timeout=60)
            console.print(f"[green]Worked[/] {result.completed} transactions after the backup")
            await references.crash(app, options.service)
            console.print(f"[red]Crashed[/] {options.service} (schema dropped)")
            state = await references.restore(app, options.service, mode=options.mode, timeout=options.timeout)
            report = await references.check(app)
        finally:
            await app.stop()
    return DisasterResult(info, result, state, report, time.monotonic() - began)


def summary(result: DisasterResult) -> str:
    """One line on the restore, as ``vmsdb restore`` prints it."""
    state = result.recovery
    waiting = f", still waiting for {', '.join(state.waiting_for)}" if state.waiting_for else ""
    n = len(state.merged)
    return (
        f"{state.service}: restored ({state.mode}) into epoch {state.epoch} (t_backup {state.t_backup}, "
        f"restored at {state.t_restore}), recovery {state.status}{waiting}; "
        f"{n} entit{'y' if n == 1 else 'ies'} brought back from cached copies "
        f"(scenario took {result.seconds:.1f} s)"
    )
