"""``python -m vmsdb_bench NAME [--seconds N] [--rounds R] [--json PATH]``.

NAME: handler, delivery, leases, relay, eshop, isolation or all.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

from vmsdb_bench import delivery, eshop, handler, isolation, leases, relay
from vmsdb_bench.harness import (
    Bench,
    BenchmarkResult,
    database_server,
    machine_info,
    make_progress,
    now_utc,
    render,
    write_json,
)

#: Where results go by default, relative to the working directory (the checkout's benchmarks/results/).
RESULTS = Path("benchmarks") / "results"


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    default_seconds: float
    run: Callable[[Bench], Awaitable[BenchmarkResult]]


BENCHMARKS = {
    m.NAME: Benchmark(m.NAME, m.DESCRIPTION, m.DEFAULT_SECONDS, m.run)
    for m in (handler, delivery, leases, relay, eshop, isolation)
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vmsdb_bench",
        description="vmsdb against hand-written asyncpg baselines, measured in the same run.",
    )
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="measuring time per benchmark, split over its phases and rounds (default: ~12-16 s each)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds per side; the best is reported (default 2)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write results (default benchmarks/results/<name>.json; with 'all', one file "
        "holding every benchmark)",
    )
    eshop_options = parser.add_argument_group("eshop", "the driver's options (eshop only)")
    eshop_options.add_argument("--mix", choices=sorted(eshop.MIXES), default="paper")
    eshop_options.add_argument("--distribution", choices=["uniform", "zipfian"], default="uniform")
    eshop_options.add_argument("--mode", choices=["continuous", "closed"], default="continuous")
    eshop_options.add_argument("--items", type=int, default=10, help="at most this many items per cart")
    eshop_options.add_argument(
        "--external",
        action="store_true",
        help="serve the eShop in its own process(es) and drive it from another over HTTP, with "
        "CPU and pg_stat_statements per transaction",
    )
    eshop_options.add_argument("--clients", default="1,16", help="client counts, e.g. 1,16 (--external)")
    eshop_options.add_argument("--workers", type=int, default=1, help="server processes (--external)")
    args = parser.parse_args(argv)
    if not 1 <= args.items <= 10:
        parser.error("--items must be within 1..10")
    try:
        args.client_counts = [int(c) for c in args.clients.split(",") if c]
    except ValueError:
        parser.error("--clients takes client counts, e.g. 1,16")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


async def main(args: argparse.Namespace) -> bool:
    """Run the selected benchmarks; ``False`` if the eShop's consistency verdict failed."""
    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=console)])
    selected = list(BENCHMARKS.values()) if args.name == "all" else [BENCHMARKS[args.name]]
    documents: dict[str, Any] = {}
    held = True
    with make_progress(console) as progress:
        where = "VMSDB_DATABASE_URL" if "VMSDB_DATABASE_URL" in os.environ else "an embedded Postgres"
        task = progress.add_task(f"starting {where}", total=None)
        async with database_server() as server_url:
            progress.remove_task(task)
            machine = await machine_info(server_url)
            for benchmark in selected:
                bench = Bench(
                    server_url,
                    seconds=args.seconds or benchmark.default_seconds,
                    rounds=args.rounds,
                    progress=progress,
                    options={
                        "external": getattr(args, "external", False),
                        "mixes": [getattr(args, "mix", "paper")],
                        "clients": getattr(args, "client_counts", [1, 16]),
                        "workers": getattr(args, "workers", 1),
                    },
                )
                started_at, clock = now_utc(), time.perf_counter()
                if benchmark.name == eshop.NAME:
                    options = eshop.Options(args.mix, args.distribution, args.mode, args.items)
                    result = await eshop.run(bench, options)
                    held = held and all(c.ok for c in result.checks)
                else:
                    result = await benchmark.run(bench)
                at_end = {**machine, "load_average_at_end": os.getloadavg()}
                document = result.to_json(at_end, started_at, time.perf_counter() - clock)
                documents[benchmark.name] = document
                console.print(render(result))
                if args.name != "all" or args.json is None:
                    path = args.json or RESULTS / f"{benchmark.name}.json"
                    write_json(path, document)
                    console.print(f"[dim]results written to {path}[/]")
    if args.name == "all" and args.json is not None:
        write_json(args.json, {"benchmarks": documents})
        console.print(f"[dim]results written to {args.json}[/]")
    return held


if __name__ == "__main__":
    raise SystemExit(0 if asyncio.run(main(parse_args())) else 1)
