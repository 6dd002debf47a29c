"""Awaiting the outcome of a chain of events: ``await app.outcome(tid, Done, Failed)``.

A waiter first looks in the log (the outcome may already be there), then waits. The core's
notification names the correlations of each committed batch of events, so a notification wakes
only the waiters of those correlations, and checks for one correlation run one at a time however
many notifications arrive meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.eventlog import find_outcome
from framework._internal.events import Event

__all__ = ["OutcomeWatcher"]


@dataclass(eq=False)
class _Waiter:
    types: dict[str, type[Event]]
    future: asyncio.Future[Event] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class OutcomeWatcher:
    """The outcome waiters of one App."""

    def __init__(self, admin: Callable[[], AbstractAsyncContextManager[AsyncConnection]]) -> None:
        self._admin = admin
        self._waiters: dict[str, list[_Waiter]] = {}
        self._dirty: set[str] = set()
        self._checking: asyncio.Task[None] | None = None

    async def wait(self, correlation_id: str, event_types: Iterable[type[Event]], timeout: float) -> Event:
        waiter = _Waiter({t.event_type(): t for t in event_types})
        if not waiter.types:
            raise ValueError("outcome() needs at least one event type to wait for")
        self._waiters.setdefault(correlation_id, []).append(waiter)
        try:
            found = await self._find(correlation_id, waiter)
            if found is not None:
                return found
            async with asyncio.timeout(timeout):
                return await waiter.future
        except TimeoutError:
            names = " or ".join(sorted(waiter.types))
            raise TimeoutError(f"no {names} in correlation {correlation_id!r} within {timeout} s") from None
        finally:
            waiters = self._waiters.get(correlation_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(correlation_id, None)

    def notified(self, correlations: str) -> None:
        """A batch of events committed; ``correlations`` is the notification's list (or ``*``)."""
        if not self._waiters or not correlations:
            return
        named = set(self._waiters) if correlations == "*" else set(correlations.split(","))
        self._dirty |= named & self._waiters.keys()
        if self._dirty and (self._checking is None or self._checking.done()):
            self._checking = asyncio.create_task(self._check())

    async def _check(self) -> None:
        while self._dirty:
            correlation_id = self._dirty.pop()
            for waiter in list(self._waiters.get(correlation_id, ())):
                if waiter.future.done():
                    continue
                found = await self._find(correlation_id, waiter)
                if found is not None and not waiter.future.done():
                    waiter.future.set_result(found)

    async def _find(self, correlation_id: str, waiter: _Waiter) -> Event | None:
        async with self._admin() as conn:
            found = await find_outcome(conn, correlation_id, sorted(waiter.types))
        return None if found is None else waiter.types[found.type].model_validate_json(found.payload)

    async def close(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.future.cancel()
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checking
