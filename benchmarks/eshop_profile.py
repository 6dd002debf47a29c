"""Where the served eShop's time goes: py-spy on ``vmsdb eshop serve`` under the external driver.

``python -m vmsdb_bench.eshop_profile [--clients 16] [--seconds 20] [--mix paper] [--gil]`` seeds a fresh
database, serves the eShop, samples the server with ``py-spy record`` (``pip install py-spy``)
while the driver runs, and prints the share of samples by where the leaf frame is (SQLAlchemy,
asyncpg, asyncio and sockets, the HTTP stack, pydantic, the framework, the core, the sample).
The collapsed stacks stay in ``benchmarks/results/eshop-served/profile-*.txt`` for a flame graph.

Without ``--gil`` a sample is wall-clock time in a running thread: a ``send()`` to Postgres
counts while the kernel runs the woken backend instead of the server (on 2 cores, much of it).
``--gil`` keeps only the samples that hold the GIL: the server's own Python work.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
from pathlib import Path

from framework.testing import fresh_database
from vmsdb_bench.eshop_external import _drive, _seed, serving, statements_server

#: Leaf-frame file path fragments, first match wins.
BUCKETS = (
    ("SQLAlchemy ORM", "sqlalchemy/orm/"),
    ("SQLAlchemy engine and pool", "sqlalchemy/engine/"),
    ("SQLAlchemy pool", "sqlalchemy/pool/"),
    ("SQLAlchemy asyncpg dialect and greenlet bridge", "sqlalchemy/dialects/"),
    ("SQLAlchemy async/greenlet", "sqlalchemy/util/_concurrency"),
    ("SQLAlchemy Core (coercion, cache keys, compilation)", "sqlalchemy/"),
    ("asyncpg", "asyncpg/"),
    ("asyncio and sockets", "asyncio/"),
    ("HTTP (uvicorn, starlette, fastapi, h11, httptools)", "uvicorn/"),
    ("HTTP (uvicorn, starlette, fastapi, h11, httptools)", "starlette/"),
    ("HTTP (uvicorn, starlette, fastapi, h11, httptools)", "fastapi/"),
    ("HTTP (uvicorn, starlette, fastapi, h11, httptools)", "h11/"),
    ("pydantic", "pydantic"),
    ("framework", "framework/"),
    ("dbcore", "dbcore/"),
    ("the eShop", "eshop/"),
    ("prometheus / telemetry", "prometheus_client/"),
)


def shares(collapsed: Path) -> list[tuple[str, float]]:
    """Share of samples per bucket, by leaf frame."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        bucket = next((name for name, part in BUCKETS if part in leaf), "other (interpreter, C, idle)")
        counts[bucket] += int(count)
        total += int(count)
    return [(name, n / total) for name, n in counts.most_common()] if total else []


async def profile(clients: int, seconds: float, mix: str, out_dir: Path, *, gil: bool = False) -> Path:
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("pip install py-spy")
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    collapsed = out_dir / f"profile-{mix}-{clients}{'-gil' if gil else ''}.txt"
    async with statements_server() as (admin_url, _), fresh_database(admin_url) as url:
        await _seed(url)
        async with serving(url, 1, out_dir) as (base, pid):
            sampler = await asyncio.create_subprocess_exec(
                spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw",
                "--output", str(collapsed), "--nonblocking", *(["--gil"] if gil else []),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await _drive(base, clients=clients, seconds=seconds, mix=mix, out=out_dir / "profile-driver.json")
            await sampler.wait()
    return collapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vmsdb_bench.eshop_profile")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--mix", choices=("paper", "vmodb"), default="paper")
    parser.add_argument("--gil", action="store_true", help="only samples that hold the GIL (Python's CPU)")
    args = parser.parse_args()
    out_dir = Path("benchmarks") / "results" / "eshop-served"
    collapsed = asyncio.run(profile(args.clients, args.seconds, args.mix, out_dir, gil=args.gil))
    for name, share in shares(collapsed):
        print(f"{share:6.1%}  {name}")
    print(f"collapsed stacks: {collapsed}")


if __name__ == "__main__":
    main()
