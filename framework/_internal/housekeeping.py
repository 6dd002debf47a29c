"""The App's background chores: pruning the log and reaping leases, and re-reading which
services recover while one does (a lost notification must not keep a service refusing)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from dbcore.eventlog import prune
from dbcore.leases import reap
from dbcore.references import recovering_services
from framework._internal.host import Host

__all__ = ["Housekeeping", "read_recovering"]

log = logging.getLogger("vmsdb.app")

#: While a service recovers in consistency mode, how often the App reads the state again.
RECOVERY_RECHECK = 1.0


async def read_recovering(host: Host) -> set[str]:
    """Services recovering in consistency mode (through the pool, not the listener)."""
    async with host.core.housekeeping_autocommit() as conn:
        return await recovering_services(conn)


class Housekeeping:
    """Background tasks of one App; ``wake(service)`` is called when a service serves again."""

    def __init__(self, host: Host, wake: Callable[[str], None], *, prune_log: bool) -> None:
        self._host = host
        self._wake = wake
        self._prune_log = prune_log
        self._tasks: list[asyncio.Task[None]] = []
        self._recheck = asyncio.Event()

    def recheck_recovery(self) -> None:
        """Read which services recover now, not at the next tick (a notification may be lost)."""
        self._recheck.set()

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._recovery_watch(), name="vmsdb-recovery-watch"))
        if self._prune_log:
            self._tasks.append(asyncio.create_task(self._prune_loop(), name="vmsdb-prune"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _recovery_watch(self) -> None:
        recovering = self._host.recovering
        while True:
            forced = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECOVERY_RECHECK):
                    await self._recheck.wait()
                    forced = True
            self._recheck.clear()
            if not recovering and not forced:
                continue
            try:
                now = await read_recovering(self._host)
            except Exception:  # the database is away: the core refuses writes anyway
                log.warning("could not read which services are recovering", exc_info=True)
                continue
            for service in recovering - now:
                self._wake(service)
            # Exactly what the core says: ended recoveries go, and one whose notification was
            # lost (the listener was away) comes in.
            recovering.intersection_update(now)
            recovering.update(now)

    async def _prune_loop(self) -> None:
        retention = self._host.settings.retention_seconds
        interval = min(max(retention / 10, 1.0), 300.0)
        while True:
            await asyncio.sleep(interval)
            try:
                async with self._host.core.housekeeping() as conn:
                    removed = await prune(conn, retention)
                    await reap(conn, retention)
                if removed:
                    log.info("pruned %d handled events older than %.0f s", removed, retention)
            except Exception:
                log.exception("pruning the event log failed")
