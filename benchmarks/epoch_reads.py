"""What a read costs around a restore: ``python -m vmsdb_bench.epoch_reads [--reads N]``.

A ``@Transactional(type="RO")`` function loads one row of a referenceable table through
``session().get``. Measured in one run, one caller, on a table of ``--rows`` rows:

- ``outside amnesia, hook bypassed``: the read as it was before reads began epochs (the hook in
  ``framework._internal.epochs`` replaced by a no-op): the baseline;
- ``outside amnesia``: the same read with the hook (a set test per transaction);
- ``first read in amnesia``: after a restore, the first read of each entity (``vms.ref_read``
  closes its interval and stamps a new version, in the reading transaction);
- ``read again in amnesia``: entities already read while others of the service still wait for
  their first read (``vms.ref_read`` finds nothing to do).

Rounds of the first two alternate, so that noise falls on both. Prints a table, writes JSON
(``benchmarks/results/epoch_reads.json``). Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Service, Transactional, session
from framework._internal import epochs
from framework.references import backup, crash, install, referenceable, restore
from framework.testing import fresh_database
from vmsdb_bench.harness import database_server, latency_summary, machine_info, now_utc


class Catalog(Service, name="bench_catalog"):
    @Transactional(type="RO")
    async def price(self, item_id: int) -> int:
        row = await session().get(Item, item_id)
        assert row is not None
        return row.price


@referenceable
class Item(Catalog.Model):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    price: Mapped[int]


async def _timed(call: Callable[[int], Awaitable[Any]], ids: list[int]) -> list[float]:
    samples = []
    for item_id in ids:
        start = time.perf_counter()
        await call(item_id)
        samples.append(time.perf_counter() - start)
    return samples


async def measure(url: str, rows: int, reads: int, rounds: int, data_dir: Path) -> dict[str, Any]:
    results: dict[str, list[float]] = {"baseline": [], "outside": [], "first": [], "again": []}
    async with App([Catalog], database_url=url, create_tables=True, workers=False, data_dir=data_dir) as app:
        await install(app)
        async with app.core.admin() as conn:
            await conn.execute(
                text("INSERT INTO bench_catalog.items SELECT g, g FROM generate_series(1, :n) g"), {"n": rows}
            )
        price = app.service(Catalog).price
        await _timed(price, random.choices(range(1, rows + 1), k=200))  # warm up
        real_track = epochs.track
        for _ in range(rounds):
            epochs.track = lambda host, ctx: None  # type: ignore[assignment]
            try:
                results["baseline"] += await _timed(price, random.choices(range(1, rows + 1), k=reads))
            finally:
                epochs.track = real_track
            results["outside"] += await _timed(price, random.choices(range(1, rows + 1), k=reads))
        await backup(app, "bench_catalog")
        await crash(app, "bench_catalog")
        await restore(app, "bench_catalog")
        for _ in range(500):  # the App hears of the restore by a notification
            if "bench_catalog" in app.host.amnesia:
                break
            await asyncio.sleep(0.01)
        first = random.sample(range(1, rows + 1), k=min(reads, rows - 1))
        results["first"] = await _timed(price, first)
        results["again"] = await _timed(price, random.choices(first, k=reads))
    return {name: latency_summary(samples) for name, samples in results.items()}


LABELS = {
    "baseline": "outside amnesia, hook bypassed",
    "outside": "outside amnesia",
    "first": "first read in amnesia",
    "again": "read again in amnesia",
}


def render(summary: dict[str, Any]) -> Table:
    table = Table(title="A one-row read through session().get, one caller")
    for column in ("read", "p50 ms", "p99 ms", "mean ms", "mean / baseline"):
        table.add_column(column)
    base = summary["baseline"]["mean_ms"]
    for name, label in LABELS.items():
        s = summary[name]
        numbers = (f"{s[key]:.3f}" for key in ("p50_ms", "p99_ms", "mean_ms"))
        table.add_row(label, *numbers, f"{s['mean_ms'] / base:.2f}")
    return table


async def main(args: argparse.Namespace) -> None:
    started = now_utc()
    async with database_server() as server, fresh_database(server) as url:
        with tempfile.TemporaryDirectory(prefix="vmsdb-bench-backups-") as tmp:
            summary = await measure(url, args.rows, args.reads, args.rounds, Path(tmp))
        machine = await machine_info(server)
    Console().print(render(summary))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "epoch_reads", "started_at": started.isoformat(), "machine": machine, **summary}
    args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--reads", type=int, default=2000, help="reads per measurement (and round)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/epoch_reads.json"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
