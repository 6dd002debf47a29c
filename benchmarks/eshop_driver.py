"""The eShop's load generator in a process of its own, as the benchmark's driver runs.

``python -m vmsdb_bench.eshop_driver URL --clients N --seconds S --mix paper|vmodb --json PATH``
runs the Online Marketplace transaction mix (``vmsdb_eshop.workload``) against a served eShop
(``vmsdb eshop serve``) over HTTP, and writes what it measured as JSON: completed transactions,
and per transaction type the count, aborts and p50/p90/p99 latency. The marketplace it knows is
the generator's (deterministic), so the server must have been seeded with the same scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx

from vmsdb_eshop.demo import DEMO_SCALE
from vmsdb_eshop.generator import generate
from vmsdb_eshop.workload import MIXES, Workload, WorkloadConfig, WorkloadResult

__all__ = ["MIXES", "drive", "per_type"]



async def drive(url: str, *, clients: int, seconds: float, mix: str) -> dict[str, Any]:
    """Run ``mix`` with ``clients`` concurrent clients against ``url`` for ``seconds``."""
    config = WorkloadConfig(duration=seconds, concurrency=clients, mix=MIXES[mix])
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        result = await Workload(client, generate(DEMO_SCALE), config).run()
    return {
        "mix": mix,
        "clients": clients,
        "duration": result.duration,
        "completed": result.completed,
        "tps": result.throughput,
        "outcomes": dict(result.outcomes),
        "dashboard_anomalies": result.dashboard_anomalies,
        "errors": result.errors[:5],
        "per_type": per_type(result),
    }


def per_type(result: WorkloadResult) -> dict[str, dict[str, float]]:
    """Count, aborts and p50/p90/p99 latency (ms) per transaction type."""
    return {
        kind.value: {
            "count": s.count,
            "aborts": s.aborts,
            "p50_ms": s.percentile(50),
            "p90_ms": s.percentile(90),
            "p99_ms": s.percentile(99),
        }
        for kind, s in result.stats.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vmsdb_bench.eshop_driver")
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--mix", choices=sorted(MIXES), default="paper")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    measured = asyncio.run(drive(args.url, clients=args.clients, seconds=args.seconds, mix=args.mix))
    args.json.write_text(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()
