"""G4: each (event, subscriber) effect commits exactly once, through kill -9, redelivery and
concurrent worker processes.

The worker processes run ``tests/integration/crash_worker.py``; its ``Ledger`` handler is not
idempotent (a counter increment and an appended ``Seen`` row), so a double effect would show.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from framework import App

from .crash_worker import CLAIM_TIMEOUT, Beat, Ledger, Start, Tick, Tock

ROOT = Path(__file__).resolve().parents[2]

#: Upper bound for any single wait in these tests (start-up, handling, exit).
WAIT = 30.0


class WorkerProcess:
    """One ``crash_worker`` subprocess; stdout and stderr go to files in the test's directory."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, out: Path, err: Path) -> None:
        self.name = name
        self.proc = proc
        self.out = out
        self.err = err

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    async def ready(self, timeout: float = WAIT) -> None:
        async def started() -> bool:
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"worker {self.name} exited with {self.proc.returncode} before it was ready:\n"
                    + self.stderr()
                )
            return "ready" in self.out.read_text().splitlines()

        await until(started, timeout, f"worker {self.name} to print 'ready'")

    async def kill(self) -> None:
        """SIGKILL (no clean-up of any kind in the worker) and reap it."""
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), WAIT)


Spawn = Callable[[str, Path], Awaitable[WorkerProcess]]


@pytest.fixture
async def spawn(vmsdb_database: str, tmp_path: Path) -> AsyncIterator[Spawn]:
    """``await spawn(name, gate_dir)``: a started, ready worker; all are killed at the end."""
    started: list[WorkerProcess] = []

    async def start(name: str, gate_dir: Path) -> WorkerProcess:
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.integration.crash_worker",
                vmsdb_database,
                name,
                str(gate_dir),
                cwd=ROOT,
                stdout=stdout,
                stderr=stderr,
                stdin=asyncio.subprocess.DEVNULL,
            )
        worker = WorkerProcess(name, proc, out, err)
        started.append(worker)
        await worker.ready()
        return worker

    try:
        yield start
    finally:
        for worker in started:
            await worker.kill()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def scalar(app: App, sql: str, **params: object) -> object:
    async with app.core.admin() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def pending(app: App) -> int:
    return int(await scalar(app, "SELECT count(*) FROM vms.deliveries WHERE subscriber = 'ledger'"))  # type: ignore[arg-type]


async def all_handled(app: App, timeout: float = WAIT) -> None:
    async def done() -> bool:
        return await pending(app) == 0

    await until(done, timeout, "every delivery to 'ledger' to be handled")


async def counters(app: App) -> dict[str, int]:
    async with app.core.admin() as conn:
        return dict((await conn.execute(text("SELECT id, n FROM ledger.counters"))).all())  # type: ignore[arg-type]


async def seen(app: App) -> list[tuple[str, str, int, str]]:
    """``(event_id, key, n, worker)`` of every committed handler run, in commit order per key."""
    async with app.core.admin() as conn:
        rows = await conn.execute(text("SELECT event_id, key, n, worker FROM ledger.seen ORDER BY seq"))
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def dead_letters(app: App) -> int:
    return int(await scalar(app, "SELECT count(*) FROM vms.dead_letters"))  # type: ignore[arg-type]


def inside(gate_dir: Path, worker: WorkerProcess) -> list[str]:
    """Event ids the worker's handler is holding (uncommitted) at the gate."""
    path = gate_dir / f"inside-{worker.pid}"
    return path.read_text().split() if path.exists() else []


async def held(gate_dir: Path, worker: WorkerProcess, count: int = 1) -> list[str]:
    async def arrived() -> bool:
        if worker.proc.returncode is not None:
            raise AssertionError(f"worker {worker.name} died:\n{worker.stderr()}")
        return len(inside(gate_dir, worker)) >= count

    await until(arrived, WAIT, f"{count} handler(s) of worker {worker.name} to reach the gate")
    return inside(gate_dir, worker)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def assert_fifo_once(rows: list[tuple[str, str, int, str]], expected: dict[str, int]) -> None:
    """Each key's events ran once each, in publication order (n = 1..count)."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for _, key, n, _ in rows:
        by_key[key].append(n)
    assert dict(by_key) == {k: list(range(1, c + 1)) for k, c in expected.items()}
    event_ids = [r[0] for r in rows]
    assert len(event_ids) == len(set(event_ids)) == sum(expected.values())


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    path = tmp_path / "gate"
    path.mkdir()
    return path


async def test_kill_9_mid_handler_then_redelivery_takes_effect_once(
    vmsdb_app_factory, spawn: Spawn, gate: Path
) -> None:
    async with vmsdb_app_factory([Ledger], workers=False) as app:
        (gate / "hold").touch()
        a = await spawn("A", gate)
        event_id = await app.publish(Tick(key="k1", n=1))

        assert await held(gate, a) == [str(event_id)]
        # A wrote its effects but has not committed: nothing is visible, A holds the claim.
        assert await counters(app) == {}
        assert await seen(app) == []
        async with app.core.admin() as conn:
            row = (
                await conn.execute(
                    text("SELECT attempts, claim FROM vms.deliveries WHERE subscriber = 'ledger'")
                )
            ).one()
        assert row.attempts == 1 and row.claim is not None

        await a.kill()
        assert await counters(app) == {}
        assert await seen(app) == []
        assert await pending(app) == 1

        (gate / "hold").unlink()
        await spawn("B", gate)
        await all_handled(app)

        assert await counters(app) == {"k1": 1}
        assert await seen(app) == [(str(event_id), "k1", 1, "B")]  # redelivered to B, effect once
        assert await dead_letters(app) == 0


async def test_kill_9_with_several_events_of_one_key_pending(
    vmsdb_app_factory, spawn: Spawn, gate: Path
) -> None:
    async with vmsdb_app_factory([Ledger], workers=False) as app:
        (gate / "hold").touch()
        # Published before A starts: once a handler's transaction is open, later events are
        # beyond the claim horizon (G3) until it ends, so A could only ever hold one of them.
        for n in range(1, 6):
            await app.publish(Tick(key="k1", n=n))
        for n in range(1, 4):
            await app.publish(Tick(key="k2", n=n))
        a = await spawn("A", gate)

        # One handler per key runs at a time: A holds the head of k1 and of k2, nothing more.
        assert len(await held(gate, a, count=2)) == 2
        await asyncio.sleep(0.3)
        assert len(inside(gate, a)) == 2
        # Published while A's handlers are open: later in the log, and in the same keys.
        for n in range(6, 9):
            await app.publish(Tick(key="k1", n=n))

        await a.kill()
        assert await counters(app) == {}
        assert await seen(app) == []
        assert await pending(app) == 11

        (gate / "hold").unlink()
        await spawn("B", gate)
        await all_handled(app)

        rows = await seen(app)
        assert_fifo_once(rows, {"k1": 8, "k2": 3})
        assert {r[3] for r in rows} == {"B"}
        assert await counters(app) == {"k1": 8, "k2": 3}
        assert await dead_letters(app) == 0


async def test_kill_9_mid_handler_of_a_handed_off_delivery_then_it_takes_effect_once(
    vmsdb_app_factory, spawn: Spawn, gate: Path
) -> None:
    """A hand-off (framework._internal.handoff): A's on_start sends Passed, which A's own
    on_passed takes over without a claim of its own. Killed mid-handler, A leaves the
    producer's claim to run out; B claims the delivery again, and it takes effect once."""
    _handed = text(
        "SELECT d.claim = e.handoff_claim FROM vms.deliveries d JOIN vms.events e ON e.position = d.position "
        "WHERE d.subscriber = 'ledger' AND e.type = 'Passed'"
    )
    async with vmsdb_app_factory([Ledger], workers=False) as app:
        a = await spawn("A", gate)
        before: dict[str, int] = {}
        # A producer that finds another transaction open (A's heartbeat, say) leaves its
        # delivery to the dispatcher: then let it through and try again with another key.
        for attempt in range(1, 6):
            (gate / "hold").touch()
            key = f"k{attempt}"
            await app.publish(Start(key=key, n=1))
            passed = (await held(gate, a, count=attempt))[-1]
            async with app.core.admin() as conn:
                handed_off = (await conn.execute(_handed)).scalar_one()
            if handed_off:
                break
            (gate / "hold").unlink()
            await all_handled(app)
            before[key] = 1
        else:
            raise AssertionError("no delivery was handed off in five tries")
        assert await counters(app) == before

        await a.kill()
        assert await counters(app) == before
        assert await pending(app) == 1

        (gate / "hold").unlink()
        await spawn("B", gate)
        await all_handled(app)

        assert [r for r in await seen(app) if r[1] == key] == [(passed, key, 1, "B")]
        assert await counters(app) == {**before, key: 1}
        assert await dead_letters(app) == 0


async def test_kill_9_mid_group_commit_then_each_event_takes_effect_once_in_order(
    vmsdb_app_factory, spawn: Spawn, gate: Path
) -> None:
    """@Inbound(group_commit=8): a worker killed inside a group's transaction commits none of
    it; the next worker handles every event once, each key in order, in groups again."""
    keys = [f"b{k}" for k in range(1, 7)]
    async with vmsdb_app_factory([Ledger], workers=False) as app:
        (gate / "hold").touch()
        for n in range(1, 4):
            for key in keys:
                await app.publish(Beat(key=key, n=n))
        a = await spawn("A", gate)

        # The six keys' heads are claimed together and run as one group, one after another:
        # the first waits at the gate with the group's transaction open, the other five behind
        # it in the same transaction (run one by one, six handlers would be at the gate).
        assert len(await held(gate, a)) == 1
        await asyncio.sleep(0.3)
        assert len(inside(gate, a)) == 1

        await a.kill()
        assert await counters(app) == {}
        assert await seen(app) == []
        assert await pending(app) == 18

        (gate / "hold").unlink()
        await spawn("B", gate)
        await all_handled(app)

        rows = await seen(app)
        assert_fifo_once(rows, dict.fromkeys(keys, 3))
        assert {r[3] for r in rows} == {"B"}
        assert await counters(app) == dict.fromkeys(keys, 3)
        assert await dead_letters(app) == 0
        transactions = int(await scalar(app, "SELECT count(DISTINCT xid) FROM ledger.seen"))  # type: ignore[arg-type]
        assert transactions < len(rows), "B handled every event in a transaction of its own"


async def test_slow_worker_whose_claim_ran_out_rolls_back(
    vmsdb_app_factory, spawn: Spawn, gate: Path
) -> None:
    """A is stuck mid-handler past its claim; B takes the delivery over; A wakes up: A's ack
    finds B's claim and A rolls back; B's run is the one effect."""
    async with vmsdb_app_factory([Ledger], workers=False) as app:
        (gate / "hold").touch()
        a = await spawn("A", gate)
        event_id = await app.publish(Tick(key="k1", n=1))
        assert await held(gate, a) == [str(event_id)]
        b = await spawn("B", gate)

        async def taken_over() -> bool:
            attempts = await scalar(
                app, "SELECT coalesce(max(attempts), 0) FROM vms.deliveries WHERE subscriber = 'ledger'"
            )
            return int(attempts) >= 2  # type: ignore[call-overload]

        # After CLAIM_TIMEOUT the delivery is claimed again (by B, or by A itself): the second
        # run blocks on the counter row A's open transaction wrote.
        await until(taken_over, CLAIM_TIMEOUT + WAIT, "the claim to run out and be taken over")
        (gate / "hold").unlink()  # A goes on to commit, with a claim that is no longer its own
        await all_handled(app)

        assert await counters(app) == {"k1": 1}
        rows = await seen(app)
        assert [r[:3] for r in rows] == [(str(event_id), "k1", 1)]
        assert await dead_letters(app) == 0
        assert a.proc.returncode is None and b.proc.returncode is None
        await asyncio.sleep(0.2)  # let the log line reach the file
        assert "was claimed by another worker" in a.stderr() + b.stderr()


async def test_claims_of_a_killed_worker_come_back_in_seconds_not_after_the_claim_timeout(
    vmsdb_app_factory, spawn: Spawn, gate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: A dies holding a Tick, which a Tock waits for (precedence). A live worker's
    heartbeat renews its claims, so a dead one's run out within seconds: B handles the Tick, then
    the Tock, long before the 30 s claim timeout, each once and in order."""
    monkeypatch.setenv("CRASH_WORKER_CLAIM_TIMEOUT", "30")
    async with vmsdb_app_factory([Ledger], workers=False) as app:
        (gate / "hold").touch()
        a = await spawn("A", gate)
        tick = await app.publish(Tick(key="k1", n=1))
        assert await held(gate, a) == [str(tick)]
        tock = await app.publish(Tock(key="k2", n=2))  # another key: it waits by precedence only
        b = await spawn("B", gate)
        await asyncio.sleep(3.0)  # longer than a claim lives unrenewed: A's heartbeat keeps it
        assert await pending(app) == 2 and await seen(app) == []
        assert inside(gate, a) == [str(tick)] and inside(gate, b) == []

        await a.kill()
        (gate / "hold").unlink()
        killed = time.monotonic()
        await all_handled(app, timeout=WAIT)
        taken_over_after = time.monotonic() - killed

        rows = await seen(app)
        assert [(r[0], r[3]) for r in rows] == [(str(tick), "B"), (str(tock), "B")]  # once, in order
        assert await counters(app) == {"k1": 1}
        # Generous: the claim lives about 2 s unrenewed; the timeout it no longer waits for is 30 s.
        assert taken_over_after < 10.0, taken_over_after


async def test_vmsdb_run_workers_starts_n_processes_that_share_the_work_and_stop_together(
    vmsdb_app_factory, vmsdb_database: str, tmp_path: Path
) -> None:
    """``vmsdb run APP --workers 2``: two worker processes on one core, every event handled
    once, and SIGTERM to the command stops both."""
    async with vmsdb_app_factory([Ledger], workers=False) as app:  # the tables, and a publisher
        out = tmp_path / "run.out"
        with out.open("wb") as stdout:
            command = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "from framework.cli import main; main()",
                "run", "tests.integration.crash_worker:SERVICES", "--workers", "2",
                cwd=ROOT, env={**os.environ, "VMSDB_DATABASE_URL": vmsdb_database},
                stdout=stdout, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip

        async def started() -> bool:
            return out.read_text().count("running ledger") == 2

        try:
            await until(started, WAIT, "both worker processes to start")
            [line] = [x for x in out.read_text().splitlines() if "worker processes" in x]
            pids = [int(p) for p in line.split("(")[1].rstrip(")").split(", ")]
            assert len(pids) == 2 and all(alive(p) for p in pids)
            for n in range(60):
                await app.publish(Tick(key=f"k{n % 6}", n=n // 6 + 1))
            await all_handled(app)
            assert_fifo_once(await seen(app), {f"k{k}": 10 for k in range(6)})
        finally:
            if command.returncode is None:
                command.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(command.wait(), WAIT) == 0, out.read_text()
        assert not any(alive(p) for p in pids)


async def test_two_worker_processes_share_work_without_double_handling(
    vmsdb_app_factory, spawn: Spawn, gate: Path
) -> None:
    keys, per_key = 40, 10
    async with vmsdb_app_factory([Ledger], workers=False) as app:
        await spawn("A", gate)
        await spawn("B", gate)
        # An open transaction with an xid holds the claim horizon back while we publish, so the
        # 400 events become claimable at once, 10 pending per key, for both workers to race on.
        async with app.core.admin() as horizon:
            await horizon.execute(text("SELECT pg_current_xact_id()"))
            for k in range(keys):  # each key's events adjacent in the log: the strictest order
                for n in range(1, per_key + 1):
                    await app.publish(Tick(key=f"k{k:02d}", n=n))
            await asyncio.sleep(0.2)
            assert await pending(app) == keys * per_key
            assert await seen(app) == []
        await all_handled(app)

        rows = await seen(app)
        assert_fifo_once(rows, {f"k{k:02d}": per_key for k in range(keys)})
        assert len(rows) == keys * per_key
        by_worker: dict[str, int] = defaultdict(int)
        for *_, worker in rows:
            by_worker[worker] += 1
        assert set(by_worker) == {"A", "B"} and min(by_worker.values()) > 0, by_worker
        totals = await counters(app)
        assert sum(totals.values()) == keys * per_key
        assert totals == {f"k{k:02d}": per_key for k in range(keys)}
        assert await dead_letters(app) == 0


async def test_duplicate_publish_of_one_event_id_has_one_effect(vmsdb_app_factory) -> None:
    async with vmsdb_app_factory([Ledger], claim_timeout=CLAIM_TIMEOUT, poll_interval=0.05) as app:
        event_id = uuid.uuid4()
        assert await app.publish(Tick(key="k1", n=1), event_id=event_id) == event_id
        assert await app.publish(Tick(key="k1", n=1), event_id=event_id) == event_id
        await app.drain(timeout=WAIT)
        # Again after it was handled: the event is still in the log, so still a no-op.
        assert await app.publish(Tick(key="k1", n=1), event_id=event_id) == event_id
        await app.drain(timeout=WAIT)

        assert await counters(app) == {"k1": 1}
        assert await seen(app) == [(str(event_id), "k1", 1, "test")]
        assert await scalar(app, "SELECT count(*) FROM vms.events WHERE id = :id", id=event_id) == 1
        assert await dead_letters(app) == 0
