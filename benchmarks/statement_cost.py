"""What one statement costs in Python, sent each way SQLAlchemy offers: the floor under the Core
and ORM bodies of ``vmsdb bench handler``.

``python -m vmsdb_bench.statement_cost [--statements 3000] [--rounds 5] [--profile]`` sends the
handler benchmark's read (``SELECT balance ... FOR UPDATE``) and write (``UPDATE ... SET
balance``) on one connection, inside one open transaction (no BEGIN, COMMIT, pool or framework:
only the statement), each way in turn, alternating, and prints this process's CPU time per
statement (best of the rounds) and how much of it is above asyncpg's own. ``--profile`` adds the
functions a prebuilt Core read spends its time in (cProfile: its times are inflated, its shares
are not).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import pstats
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import bindparam, lambda_stmt, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from framework.testing import fresh_database
from vmsdb_bench.handler import _READ, _READ_BALANCE, _WRITE, _WRITE_BALANCE, ACCOUNTS, Account, _prepare
from vmsdb_bench.harness import database_server

_ORM_READ = select(Account).where(Account.id == bindparam("account")).with_for_update()
_TEXT_READ = text("SELECT balance FROM ledger.accounts WHERE id = :account FOR UPDATE")


def _read_in_sync(sync: Connection, account: str) -> int:
    balance: int = sync.execute(_READ_BALANCE, {"account": account}).scalar_one()
    return balance


async def measure(statements: int, rounds: int, profile: bool) -> None:
    async with database_server() as server, fresh_database(server) as url:
        await _prepare(url)
        engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                driver: Any = (await conn.get_raw_connection()).driver_connection
                session = AsyncSession(bind=conn, expire_on_commit=False, autoflush=True)
                await driver.execute("BEGIN")
                rows: dict[str, Account] = {}

                async def orm_change(account: str) -> None:
                    row = rows.get(account)
                    if row is None or row not in session:
                        row = rows[account] = await session.get(Account, account)
                    assert row is not None
                    row.balance += 1
                    await session.flush()

                reads: dict[str, Callable[[str], Awaitable[Any]]] = {
                    "asyncpg fetchval (the floor)": lambda a: driver.fetchval(_READ, a),
                    "Core, built per call": lambda a: conn.execute(
                        select(Account.balance).where(Account.id == a).with_for_update()
                    ),
                    "Core, built once with bindparam()": lambda a: conn.execute(
                        _READ_BALANCE, {"account": a}
                    ),
                    "Core, lambda_stmt()": lambda a: conn.execute(
                        lambda_stmt(lambda: select(Account.balance).where(Account.id == a).with_for_update())
                    ),
                    "Core, text() built once": lambda a: conn.execute(_TEXT_READ, {"account": a}),
                    "Core, exec_driver_sql()": lambda a: conn.exec_driver_sql(_READ, (a,)),
                    "Core built once, run_sync()": lambda a: conn.run_sync(_read_in_sync, a),
                    "ORM, session.get(with_for_update=True)": lambda a: session.get(
                        Account, a, with_for_update=True
                    ),
                    "ORM, select(Account) built once": lambda a: session.execute(_ORM_READ, {"account": a}),
                }
                writes: dict[str, Callable[[str], Awaitable[Any]]] = {
                    "asyncpg execute (the floor)": lambda a: driver.execute(_WRITE, a, 1),
                    "Core, built per call": lambda a: conn.execute(
                        update(Account).where(Account.id == a).values(balance=1)
                    ),
                    "Core, built once with bindparam()": lambda a: conn.execute(
                        _WRITE_BALANCE, {"account": a, "new_balance": 1}
                    ),
                    "ORM, attribute change + flush()": orm_change,
                    "ORM, update() built once, session.execute()": lambda a: session.execute(
                        _WRITE_BALANCE, {"account": a, "new_balance": 1}
                    ),
                }
                accounts = [f"a{random.randrange(ACCOUNTS)}" for _ in range(statements)]
                for title, ways in (("read", reads), ("write", writes)):
                    best = {name: float("inf") for name in ways}
                    for _ in range(rounds):
                        for name, way in ways.items():
                            for account in accounts[:100]:  # warm: compiled cache, prepared statements
                                await way(account)
                            started = time.process_time()
                            for account in accounts:
                                await way(account)
                            best[name] = min(best[name], (time.process_time() - started) / statements * 1e6)
                            session.expunge_all()
                    floor = next(iter(best.values()))
                    print(f"\n{title}: CPU per statement (best of {rounds} rounds of {statements:,})")
                    for name, us in best.items():
                        print(f"  {us:6.1f} µs  {us - floor:+6.1f} µs over asyncpg  {name}")
                if profile:
                    profiler = cProfile.Profile(time.process_time)  # CPU: not the wait for the server
                    profiler.enable()
                    for account in accounts:
                        await conn.execute(_READ_BALANCE, {"account": account})
                    profiler.disable()
                    _print_profile(profiler, statements)
                await driver.execute("ROLLBACK")
                await session.close()
        finally:
            await engine.dispose()


#: Layers of a statement's Python, by where a function is defined (first match wins).
_LAYERS = (
    ("SQLAlchemy asyncpg dialect", "sqlalchemy/dialects/"),
    ("SQLAlchemy async bridge (greenlets)", "sqlalchemy/ext/asyncio/"),
    ("SQLAlchemy async bridge (greenlets)", "sqlalchemy/util/concurrency"),
    ("SQLAlchemy async bridge (greenlets)", "greenlet"),
    ("SQLAlchemy engine (execution context, result)", "sqlalchemy/engine/"),
    ("SQLAlchemy SQL (compiled cache, parameters)", "sqlalchemy/sql/"),
    ("SQLAlchemy other", "sqlalchemy/"),
    ("asyncpg", "asyncpg/"),
    ("socket send/recv (wakes the server)", "socket"),
    ("event loop", "asyncio/"),
    ("event loop", "select"),
)


def _print_profile(profiler: cProfile.Profile, statements: int) -> None:
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in stats.values())
    layers: collections.Counter[str] = collections.Counter()
    for (path, _line, func), row in stats.items():
        where = f"{path} {func}"
        layers[next((name for name, part in _LAYERS if part in where), "other")] += row[2]
    each = total / statements * 1e6
    print(f"\nCore, built once: where a statement's time goes (cProfile: {each:.0f} µs each, inflated)")
    for name, spent in layers.most_common():
        print(f"  {spent / total:5.1%}  {name}")
    print("  the SQLAlchemy functions that take the most (own time; calls count coroutine resumptions):")
    own = sorted(((k, v) for k, v in stats.items() if "sqlalchemy/" in k[0]), key=lambda kv: -kv[1][2])
    for (path, line, func), row in own[:12]:
        where = re.sub(r".*/site-packages/", "", path)
        print(f"  {row[2] / total:5.1%}  {row[1] / statements:4.1f} calls  {where}:{line}({func})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vmsdb_bench.statement_cost")
    parser.add_argument("--statements", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(measure(args.statements, args.rounds, args.profile))


if __name__ == "__main__":
    main()
