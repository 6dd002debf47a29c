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
        "per_type": {
            kind.value: {
                "count": s.count,
                "aborts": s.aborts,
                "p50_ms": s.percentile(50),
                "p90_ms": s.percentile(90),
                "p99_ms": s.percentile(99),
            }
            for kind, s in mix.stats.items()
        },
    }
    return result
