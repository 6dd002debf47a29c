"""The App's LISTEN connection: the core's notifications, turned into calls.

Two channels: the event log's (``<subscribers>\\n<correlations and their types>`` per committed
batch, see ``dbcore.notifications``) and recovery's (``<service>\\n<mode>``, mode empty when it
serves again). The connection is the core role's own asyncpg connection, outside the pool: a
LISTEN must live as long as the App, and a pooled connection would carry it to other users.

The connection is watched: when it drops (a database restart, a network cut) or stops answering
a periodic ping, it is opened again with backoff, and ``on_reconnect`` runs once it is back.
Notifications sent while it was down are lost, so ``on_reconnect`` must re-check whatever waits
on them (dispatchers, outcome waiters, the recovery state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg

from dbcore.core import Core
from dbcore.eventlog import NOTIFY_CHANNEL
from dbcore.notifications import parse_events_notification
from dbcore.reference_catalog import RECOVERY_CHANNEL

__all__ = ["Listener"]

log = logging.getLogger("vmsdb.app")

#: Called with the subscribers and the correlations a committed batch names, each with the event
#: types committed in it (``None``: not said); ``None`` for "any correlation" (``*``).
OnEvents = Callable[[Sequence[str], Mapping[str, frozenset[str] | None] | None], None]
#: Called with a service and its recovery mode ("" once it serves again).
OnRecovery = Callable[[str, str], None]

#: How often an idle connection is pinged (a half-open TCP connection never reports its loss).
PING_INTERVAL = 5.0
PING_TIMEOUT = 3.0
#: Reconnection backoff: the first retry, doubled up to the cap.
RETRY_FIRST, RETRY_CAP = 0.1, 2.0


class Listener:
    """Listens on the core's channels for as long as it is open, reconnecting as needed."""

    def __init__(
        self,
        core: Core,
        on_events: OnEvents,
        on_recovery: OnRecovery,
        on_reconnect: Callable[[], None],
    ) -> None:
        self._core = core
        self._on_events = on_events
        self._on_recovery = on_recovery
        self._on_reconnect = on_reconnect
        self._connection: Any = None
        self._lost = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect and listen; raises if the database cannot be reached now."""
        await self._connect()
        self._watch = asyncio.create_task(self._keep_open(), name="vmsdb-listener")

    async def _connect(self) -> None:
        engine = self._core.core_engine
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        connection = await asyncpg.connect(*args, **kwargs)
        try:
            connection.add_termination_listener(lambda _conn: self._lost.set())
            await connection.add_listener(NOTIFY_CHANNEL, self._events)
            await connection.add_listener(RECOVERY_CHANNEL, self._recovery)
        except BaseException:
            await connection.close()
            raise
        self._lost.clear()
        self._connection = connection

    def _events(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        notification = parse_events_notification(payload)
        self._on_events(notification.subscribers, notification.committed)

    def _recovery(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        service, _, mode = payload.partition("\n")
        self._on_recovery(service, mode)

    async def _alive(self) -> bool:
        """Wait for a loss or the next ping; False when the connection is gone."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PING_INTERVAL):
                await self._lost.wait()
                return False
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await self._connection.execute("SELECT 1")
        except Exception:
            return False
        return True

    async def _keep_open(self) -> None:
        while True:
            if await self._alive():
                continue
            lost_at = time.monotonic()
            log.warning("the LISTEN connection to the core was lost; reconnecting")
            await self._drop()
            delay = RETRY_FIRST
            while True:
                try:
                    await self._connect()
                    break
                except Exception as err:
                    log.debug("reconnecting the LISTEN connection failed: %s", err)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_CAP)
            log.warning("the LISTEN connection is back after %.1f s", time.monotonic() - lost_at)
            self._on_reconnect()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.terminate()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
