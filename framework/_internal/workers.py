"""The App's handler workers: a fixed number of tasks that run claimed deliveries.

Dispatchers (one per service, see ``framework._internal.dispatcher``) claim deliveries ahead of need and
queue them here; ``worker_concurrency`` workers take them, each service's in order and the
services in turn, so a service with a backlog never makes another's events wait behind all of
it. A service limited by ``ServiceLimits(concurrency=)`` has at most that many of its handlers
(and direct calls) running: a worker takes a job only when the job's service has a free slot,
before it checks out a connection, and otherwise serves the next service in turn (or, when every
service with work is at its limit, waits for a slot to free). A worker keeps its pooled
connection while there is work, so a backlog is handled without a pool checkout per event,
and gives it back as soon as the queue runs dry, so an idle App holds no connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore import delivery
from dbcore.connections import checked_out
from dbcore.core import Core
from dbcore.delivery import Claimed
from framework._internal import telemetry
from framework._internal.limits import Slots

__all__ = ["Handler", "HandlerWorkers", "Job"]

log = logging.getLogger("vmsdb.delivery")

#: After a failed connection checkout, wait this long before the next (the database is away).
_RECONNECT_PAUSE = 0.5


class Handler(Protocol):
    """Who claimed a delivery and runs it: a service's dispatcher."""

    @property
    def service(self) -> str: ...

    async def handle(self, item: Claimed, conn: AsyncConnection) -> None: ...

    def group_limit(self, item: Claimed) -> int:
        """How many deliveries a group that starts with ``item`` may hold (1: run it alone)."""
        ...

    def groups_with(self, first: Claimed, other: Claimed) -> bool:
        """Whether ``other`` may run in the same transaction as ``first``."""
        ...

    async def handle_group(self, items: list[Claimed], conn: AsyncConnection) -> None: ...

    def finished(self, item: Claimed) -> None: ...


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed delivery waiting for a worker, and when its claim is too old to start on."""

    dispatcher: Handler
    item: Claimed
    start_before: float  # loop time


class HandlerWorkers:
    """``size`` workers sharing the claimed deliveries of every service of an App."""

    def __init__(self, core: Core, size: int, slots: Mapping[str, Slots] | None = None) -> None:
        self.core = core
        self.size = size
        self._slots = dict(slots or {})  # services with a concurrency limit
        for limited in self._slots.values():
            limited.on_release = self._wake
        self._changed = asyncio.Event()  # a slot freed or a job came: capped workers look again
        self._queues: dict[str, deque[Job]] = {}  # per service, in claim order
        self._turns: deque[str] = deque()  # services with work, in the order they are served
        self._available: asyncio.Queue[bool] = asyncio.Queue()  # one True per job, False: stop
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"vmsdb-handler-{i}") for i in range(self.size)]

    def submit(self, job: Job) -> None:
        self._enqueue(job, front=False)

    def _enqueue(self, job: Job, *, front: bool) -> None:
        """Queue ``job`` for its service (``front``: a job taken but not started goes back first)."""
        service = job.dispatcher.service
        queue = self._queues.setdefault(service, deque())
        if not queue:
            (self._turns.appendleft if front else self._turns.append)(service)
        (queue.appendleft if front else queue.append)(job)
        self._available.put_nowait(True)
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _take(self) -> list[Job] | None:
        """The next service's oldest job whose service has a free slot, its slot taken, with the
        jobs right behind it that its handler runs in the same transaction (see
        :meth:`_group`); that service goes to the back of the line. ``None``: no job, or every
        one's service is at its concurrency limit."""
        for _ in range(len(self._turns)):
            service = self._turns.popleft()
            limited = self._slots.get(service)
            if limited is not None and not limited.try_acquire():
                self._turns.append(service)  # at its limit: its jobs wait, without a connection
                continue
            queue = self._queues[service]
            group = self._group(queue.popleft(), queue)
            if queue:
                self._turns.append(service)
            return group
        return None

    def _group(self, first: Job, queue: deque[Job]) -> list[Job]:
        """``first`` and the jobs queued right behind it that its handler runs in the same
        transaction (``@Inbound(group_commit=)``), taken off ``queue``.

        The queue holds at most one delivery per partition key of a subscriber (a key's next
        delivery is claimed only after the previous one is acknowledged), so a group never
        holds two events of one key: order per key is kept.
        """
        handler = first.dispatcher
        limit = handler.group_limit(first.item) if queue else 1
        group = [first]
        while queue and len(group) < limit:
            job = queue[0]
            if job.dispatcher is not handler or not handler.groups_with(first.item, job.item):
                break
            group.append(queue.popleft())
            # Each queued job put one token in _available; this one is taken without a worker
            # having waited for it, so its token goes too (queued jobs never outnumber tokens).
            self._available.get_nowait()
        return group

    def _release(self, group: list[Job]) -> None:
        """The slot a job (or a group: one transaction) took."""
        limited = self._slots.get(group[0].dispatcher.service)
        if limited is not None:
            limited.release()

    def _put_back(self, group: list[Job]) -> None:
        """Jobs taken (their slot too) but not started: first in line again, the slot freed."""
        self._release(group)
        for job in reversed(group):
            self._enqueue(job, front=True)

    async def stop(self) -> None:
        """Give back the claims nobody started on, then let running handlers finish."""
        waiting = [job for queue in self._queues.values() for job in queue]
        self._queues.clear()
        self._turns.clear()
        if waiting:
            with contextlib.suppress(Exception):  # unreleased claims simply run out
                async with self.core.housekeeping() as conn:
                    for job in waiting:
                        await delivery.release(conn, job.item)
        for job in waiting:
            job.dispatcher.finished(job.item)
        for _ in self._tasks:
            self._available.put_nowait(False)
        self._wake()  # workers waiting for a slot look again, and find the stop
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not await self._available.get():
                return
            group = self._take()
            if group is None:
                if self._turns:  # work there is, all of it at its services' limits
                    changed = self._changed
                    self._available.put_nowait(True)  # the job is still there for a worker
                    await changed.wait()
                continue
            try:
                # The connection is logged in as the job's service: it runs that service's jobs
                # only, and is given back when the next job is another service's.
                service = group[0].dispatcher.service
                async with checked_out(self.core.service_engine(service)) as conn:
                    while group is not None:
                        running, group = group, None
                        try:
                            if len(running) == 1:
                                await self._run(running[0], conn, loop.time())
                            else:
                                await self._run_group(running, conn, loop.time())
                        finally:
                            self._release(running)
                        if conn.invalidated or self._available.empty():
                            break
                        if not self._available.get_nowait():
                            return
                        group = self._take()
                        if group is None:  # the rest is at its limits: leave it to the workers
                            self._available.put_nowait(True)
                            break
                        if group[0].dispatcher.service != service:
                            break
            except Exception:  # the database went away: claims in hand run out, are claimed again
                log.exception("a handler worker lost its database connection")
                if group is not None:  # checked out no connection, so never ran
                    self._release(group)
                    for job in group:
                        job.dispatcher.finished(job.item)
                    group = None
                await asyncio.sleep(_RECONNECT_PAUSE)
                continue
            if group is not None:  # another service's: run it on a connection of its own
                self._put_back(group)

    async def _run_group(self, group: list[Job], conn: AsyncConnection, now: float) -> None:
        ready = [job for job in group if now < job.start_before]
        for job in group:
            if job not in ready:  # claimed too long ago: _run leaves it to run out
                await self._run(job, conn, now)
        if len(ready) == 1:
            await self._run(ready[0], conn, now)
        elif ready:
            try:
                await ready[0].dispatcher.handle_group([job.item for job in ready], conn)
            finally:
                for job in ready:
                    job.dispatcher.finished(job.item)

    @staticmethod
    async def _run(job: Job, conn: AsyncConnection, now: float) -> None:
        try:
            if now < job.start_before:
                with telemetry.delivery_context(job.item):
                    await job.dispatcher.handle(job.item, conn)
            else:
                # Claimed too long ago: another worker may take it over any moment; let it.
                log.info(
                    "%s: event %s waited too long for a worker; its claim will run out and it "
                    "will be claimed again",
                    job.dispatcher.service,
                    job.item.event_id,
                )
        finally:
            job.dispatcher.finished(job.item)
