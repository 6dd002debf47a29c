"""``eshop``: the eShop sample under the Online Marketplace benchmark's transaction mix.

There is no hand-written eShop to compare with, so this one reports what it measures: completed
transactions per second, and per transaction type its count, aborts and p50/p90 latency, with
the consistency check's verdict on the same database afterwards. The setup is the demo's
(``vmsdb eshop demo``): eight services in one App on one core, schemas from their migrations, a
seeded marketplace where popular items sell out, concurrent clients over the HTTP API in process
(httpx's ASGI transport), so the clients, the API and every handler share one Python process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vmsdb_bench.eshop_driver import per_type
from vmsdb_bench.eshop_external import run_external
from vmsdb_bench.harness import Bench, BenchmarkResult, Check, Measurement
from vmsdb_eshop.app import create_app
from vmsdb_eshop.check import check
from vmsdb_eshop.demo import DEMO_SCALE, drive_mix
from vmsdb_eshop.generator import generate, load
from vmsdb_eshop.workload import MIXES, WorkloadConfig

__all__ = ["MIXES", "Options", "run"]

NAME = "eshop"
DESCRIPTION = "the eShop under the benchmark's transaction mix (absolute figures: no baseline)"
DEFAULT_SECONDS = 30.0

CONCURRENCY = 8
#: Logs of the served runs (the server's output, the driver's JSON).
LOG_DIR = Path("benchmarks") / "results" / "eshop-served"
#: The simulated payment provider's latency and decline rate, stated beside every figure.
PAYMENT_LATENCY = 0.003
PAYMENT_FAILURES = 0.03


@dataclass(frozen=True)
class Options:
    mix: str = "paper"
    distribution: str = "uniform"
    mode: str = "continuous"
    items: int = 10


async def run(bench: Bench, options: Options = Options()) -> BenchmarkResult:
    if bench.options.get("external"):
        return await run_served(bench, options)
    # The services log each retried conflict at INFO; the totals are in the table.
    logging.getLogger("vmsdb").setLevel(logging.WARNING)
    async with bench.database() as url:
        app = create_app(database_url=url)
        await app.start()
        try:
            market = generate(DEMO_SCALE)
            with bench.phase("seeding the marketplace", total=1) as tick:
                await load(app, market)
                tick(1)
            config = WorkloadConfig(
                duration=bench.seconds,
                concurrency=CONCURRENCY,
                mix=MIXES[options.mix],
                distribution=options.distribution,
                mode=options.mode,
                max_items=options.items,
                payment_failure_rate=PAYMENT_FAILURES,
            )
            with bench.phase("transaction mix, then every chain and payment", total=bench.seconds) as tick:
                ran = await drive_mix(
                    app, market, config, lambda elapsed, _done: tick(elapsed), payment_latency=PAYMENT_LATENCY
                )
            mix, drained = ran.result, ran.drained
            verdict = await check(app, ran.evidence(market))
        finally:
            await app.stop()

    result = BenchmarkResult(NAME, DESCRIPTION)
    result.measurements = [
        Measurement(
            f"completed transactions, {CONCURRENCY} clients ({options.mix} mix, {options.distribution}, "
            f"{options.mode})",
            "TPS",
            round(mix.throughput, 1),
        ),
        *(
            Measurement(
                f"{kind.value}: {stats.count} run, {stats.aborts} aborted",
                "p50 / p90 / p99 ms",
                f"{stats.percentile(50):.1f} / {stats.percentile(90):.1f} / {stats.percentile(99):.1f}",
            )
            for kind, stats in mix.stats.items()
            if stats.count
        ),
    ]
    result.checks = [Check(r.name, r.summary(), "—", r.ok) for r in verdict.results]
    broken = [r.name for r in verdict.results if not r.ok]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(mix.outcomes.items()))
    result.notes = [
        f"{mix.duration:.1f} s of the mix over {DEMO_SCALE.customers} customers and "
        f"{DEMO_SCALE.sellers * DEMO_SCALE.products_per_seller} products; checkouts: {outcomes}",
        f"the event chains still running when the mix ended finished {drained:.1f} s later",
        "clients, API and handlers share one Python process (the demo's setup)",
        f"simulated payment provider: {PAYMENT_LATENCY * 1000:.0f} ms per call, "
        f"{PAYMENT_FAILURES:.0%} declined",
        "aborts by cause: "
        + (", ".join(f"{k} {c}: {n}" for (k, c), n in sorted(mix.aborts.items())) or "none"),
        f"live dashboards: {mix.ledger.dashboards} checked, {mix.dashboard_anomalies} inconsistent",
        *([f"broken checks: {', '.join(broken)}"] if broken else []),
        *(f"error: {e}" for e in mix.errors[:3]),
    ]
    result.details = {
        "concurrency": CONCURRENCY,
        "options": dict(options.__dict__),
        "payment_provider": {"latency_ms": PAYMENT_LATENCY * 1000, "failure_rate": PAYMENT_FAILURES},
        "aborts": {f"{k} {c}": n for (k, c), n in mix.aborts.items()},
        "outcomes": dict(mix.outcomes),
        "dashboard_anomalies": mix.dashboard_anomalies,
        "per_type": per_type(mix),
    }
    return result


async def run_served(bench: Bench, options: Options) -> BenchmarkResult:
    """``--external``: ``vmsdb eshop serve`` driven by a load generator in another process
    (``options.mix``; the driver's other options are its defaults)."""
    logging.getLogger("vmsdb").setLevel(logging.WARNING)
    mixes = [options.mix]
    clients: list[int] = bench.options.get("clients", [1, 16])
    workers: int = bench.options.get("workers", 1)
    with bench.phase(f"{len(mixes) * len(clients)} served runs of {bench.seconds:.0f} s", total=1) as tick:
        runs = await run_external(
            mixes=mixes, clients=clients, workers=workers, seconds=bench.seconds, log_dir=LOG_DIR
        )
        tick(1)
    result = BenchmarkResult(NAME, f"{DESCRIPTION}; served by {workers} process(es), external driver")
    for r in runs:
        label = f"{r.mix} mix, {r.clients} client(s)"
        statements = "n/a" if r.statements is None else f"{r.per_tx(r.statements):.1f}"
        result.measurements.append(
            Measurement(
                label,
                "TPS; server / Postgres CPU ms per tx; statements per tx",
                f"{r.driver['tps']:.1f}; {1000 * r.per_tx(r.server_cpu_s):.1f} / "
                f"{1000 * r.per_tx(r.postgres_cpu_s):.1f}; {statements}",
            )
        )
        result.measurements.append(
            Measurement(f"  Postgres sessions opened during the run ({label})", "sessions", str(r.sessions))
        )
        if r.handed_off is not None:
            result.measurements.append(
                Measurement(
                    f"  deliveries handed off by their producer ({label})",
                    "share of handled",
                    f"{100 * r.handed_off:.0f} %",
                )
            )
        for kind, stats in r.driver["per_type"].items():
            if stats["count"]:
                result.measurements.append(
                    Measurement(
                        f"  {kind}: {stats['count']} run, {stats['aborts']} aborted",
                        "p50 / p90 / p99 ms",
                        f"{stats['p50_ms']:.1f} / {stats['p90_ms']:.1f} / {stats['p99_ms']:.1f}",
                    )
                )
        result.checks.append(
            Check(f"consistency after {label}", ", ".join(r.broken) or "all hold", "—", r.consistent)
        )
    result.notes = [
        f"load average after each run: {', '.join(f'{r.load_average[0]:.2f}' for r in runs)}",
        "chains still running when the driver stopped are finished before CPU and statements are read",
        *(f"error ({r.mix}, {r.clients}): {e}" for r in runs for e in r.driver["errors"][:2]),
    ]
    result.details = {"runs": [r.to_json() for r in runs]}
    return result
