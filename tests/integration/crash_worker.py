"""A worker process for the crash-recovery tests (G4), and the service it runs.

``python -m tests.integration.crash_worker <database_url> <worker_name> <gate_dir>`` starts an
App running :class:`Ledger`'s handler, prints ``ready`` once started, and runs until killed.

The handler is deliberately not idempotent: it increments a counter and appends a ``Seen`` row
(no unique constraint on the event id), so an effect that commits twice is visible. While the
file ``<gate_dir>/hold`` exists, the handler writes its effects, then appends the event id to
``<gate_dir>/inside-<pid>`` and waits, before committing, until the file is removed: a test can
kill it mid-handler, or let it go on after another worker took its delivery over.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from sqlalchemy import BigInteger, Identity, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Event, Inbound, Outbound, Service, Transactional, send, session
from framework._internal.context import current

#: A claim is taken over after this many seconds even when its worker lives on (stuck); the
#: environment variable overrides it for a test that needs it long.
CLAIM_TIMEOUT = float(os.environ.get("CRASH_WORKER_CLAIM_TIMEOUT", "2.0"))

WORKER_NAME = os.environ.get("CRASH_WORKER_NAME", "test")
GATE_DIR: Path | None = None


class Tick(Event, key="key"):
    key: str
    n: int


class Tock(Event, key="key"):
    """Handled after every ``Tick`` committed before it (precedence), whatever its key."""

    key: str
    n: int


class Beat(Event, key="key"):
    """Handled in groups (``group_commit``): several keys' events in one transaction."""

    key: str
    n: int


class Start(Event, key="key"):
    """Handled by ``Ledger.on_start``, which sends a ``Passed``: to its own App's handler, so
    that delivery is handed off (``framework._internal.handoff``)."""

    key: str
    n: int


class Passed(Event, key="key"):
    key: str
    n: int


class Ledger(Service, name="ledger"):
    @Inbound(Tick, precedence=Tock)
    @Transactional(type="RW", isolation="read_committed")
    async def on_tick(self, ev: Tick) -> None:
        await _count(ev)

    @Inbound(Beat, group_commit=8)
    @Transactional(type="RW", isolation="read_committed")
    async def on_beat(self, ev: Beat) -> None:
        await _count(ev)

    @Inbound(Start)
    @Outbound(Passed)
    @Transactional(type="RW", isolation="read_committed")
    async def on_start(self, ev: Start) -> None:
        send(Passed(key=ev.key, n=ev.n))

    @Inbound(Passed)
    @Transactional(type="RW", isolation="read_committed")
    async def on_passed(self, ev: Passed) -> None:
        await _count(ev)

    @Inbound(Tock)
    @Transactional(type="RW", isolation="read_committed")
    async def on_tock(self, ev: Tock) -> None:
        ctx = current()
        assert ctx is not None
        session().add(Seen(event_id=str(ctx.causation_id), key=ev.key, n=ev.n, worker=WORKER_NAME))


async def _count(ev: Tick | Beat | Passed) -> None:
    """Count ``ev`` (not idempotent: a second commit adds 1 again); wait at the gate."""
    ctx = current()
    assert ctx is not None
    s = session()
    # Non-idempotent on purpose: a second commit of the same event adds 1 again.
    await s.execute(insert(Counter).values(id=ev.key, n=0).on_conflict_do_nothing())
    await s.execute(update(Counter).where(Counter.id == ev.key).values(n=Counter.n + 1))
    s.add(Seen(event_id=str(ctx.causation_id), key=ev.key, n=ev.n, worker=WORKER_NAME))
    await s.flush()
    if GATE_DIR is not None and (GATE_DIR / "hold").exists():
        with (GATE_DIR / f"inside-{os.getpid()}").open("a") as f:
            f.write(f"{ctx.causation_id}\n")
        # Effects written, not committed: wait here (to be killed) until the hold is lifted.
        while True:
            await asyncio.sleep(0.05)
            if not (GATE_DIR / "hold").exists():
                break


class Counter(Ledger.Model):
    __tablename__ = "counters"
    id: Mapped[str] = mapped_column(primary_key=True)
    n: Mapped[int]


class Seen(Ledger.Model):
    """One row per committed handler run; no unique constraint, so duplicates would show."""

    __tablename__ = "seen"
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[str]
    key: Mapped[str]
    n: Mapped[int]
    worker: Mapped[str]
    #: The handling transaction: events handled in one group share it.
    xid: Mapped[int] = mapped_column(BigInteger, server_default=text("txid_current()"))


#: For ``vmsdb run tests.integration.crash_worker:SERVICES``.
SERVICES = [Ledger]


async def run(database_url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with App(
        [Ledger],
        database_url=database_url,
        create_tables=True,
        claim_timeout=CLAIM_TIMEOUT,
        poll_interval=0.05,
    ):
        print("ready", flush=True)
        await stop.wait()


def main(argv: list[str]) -> None:
    global GATE_DIR, WORKER_NAME
    if len(argv) != 3:
        sys.exit("usage: python -m tests.integration.crash_worker <database_url> <worker_name> <gate_dir>")
    database_url, WORKER_NAME, gate = argv
    GATE_DIR = Path(gate)
    asyncio.run(run(database_url))


if __name__ == "__main__":
    main(sys.argv[1:])
