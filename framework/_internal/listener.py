"""The App's LISTEN connection: the core's notifications, turned into calls.

Two channels: the event log's (``<subscribers>\\n<correlations>`` per committed batch, see
``dbcore.eventlog``) and recovery's (``<service>\\n<mode>``, mode empty when it serves again).
The connection is the administrator's own asyncpg connection, outside the pool: a LISTEN must
live as long as the App, and a pooled connection would carry it to other users.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from dbcore.core import Core
from dbcore.eventlog import NOTIFY_CHANNEL
from dbcore.reference_catalog import RECOVERY_CHANNEL

__all__ = ["Listener"]

#: Called with the subscribers and the correlations a committed batch names ("*": any).
OnEvents = Callable[[Sequence[str], str], None]
#: Called with a service and its recovery mode ("" once it serves again).
OnRecovery = Callable[[str, str], None]


class Listener:
    """Listens on the core's channels for as long as it is open."""

    def __init__(self, core: Core, on_events: OnEvents, on_recovery: OnRecovery) -> None:
        self._core = core
        self._on_events = on_events
        self._on_recovery = on_recovery
        self._connection: Any = None

    async def open(self) -> None:
        engine = self._core.engine
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        self._connection = await asyncpg.connect(*args, **kwargs)
        await self._connection.add_listener(NOTIFY_CHANNEL, self._events)
        await self._connection.add_listener(RECOVERY_CHANNEL, self._recovery)

    def _events(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        subscribers, _, correlations = payload.partition("\n")
        self._on_events(subscribers.split(",") if subscribers else (), correlations)

    def _recovery(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        service, _, mode = payload.partition("\n")
        self._on_recovery(service, mode)

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
