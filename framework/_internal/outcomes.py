"""Awaiting the outcome of a chain of events: ``await app.outcome(tid, Done, Failed)``.

A waiter first looks in the log (the outcome may already be there), then waits. The core's
notification names the correlations of each committed batch of events and the event types
committed in each (``dbcore.notifications``), so a notification wakes only the waiters of those
correlations that await one of those types: the other events of a chain (which all share its
correlation) cost no lookup. Lookups are batched: one task looks up every correlation marked
since its last look in one statement, on an autocommit connection (no ``BEGIN``/``COMMIT``
around a read), however many waiters and notifications arrive meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.eventlog import find_outcomes
from framework._internal.events import Event

__all__ = ["OutcomeWatcher"]

log = logging.getLogger("vmsdb.outcomes")

#: After a failed lookup (the database went away), look again this much later.
_RETRY_AFTER = 0.5


@dataclass(eq=False)
class _Waiter:
    types: dict[str, type[Event]]
    future: asyncio.Future[Event] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class OutcomeWatcher:
    """The outcome waiters of one App.

    ``connect`` opens an autocommit connection (``Core.autocommit``): a lookup is one statement.
    """

    def __init__(self, connect: Callable[[], AbstractAsyncContextManager[AsyncConnection]]) -> None:
        self._connect = connect
        self._waiters: dict[str, list[_Waiter]] = {}
        self._dirty: set[str] = set()
        self._checking: asyncio.Task[None] | None = None

    async def wait(self, correlation_id: str, event_types: Iterable[type[Event]], timeout: float) -> Event:
        waiter = _Waiter({t.event_type(): t for t in event_types})
        if not waiter.types:
            raise ValueError("outcome() needs at least one event type to wait for")
        # Registered before the first look: a notification from now on marks it again, so an
        # outcome that commits between the look and the wait is not missed.
        self._waiters.setdefault(correlation_id, []).append(waiter)
        try:
            self._mark({correlation_id})
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

    def notified(self, committed: Mapping[str, frozenset[str] | None] | None) -> None:
        """A batch of events committed: ``committed`` maps each of its correlations to the event
        types committed in it (``None``: not said, any); ``committed=None`` looks at every
        waiter (a notification that could not list them, or notifications lost)."""
        if not self._waiters:
            return
        if committed is None:
            self._mark(set(self._waiters))
            return
        self._mark({c for c, types in committed.items() if c in self._waiters and self._awaits(c, types)})

    def _awaits(self, correlation_id: str, types: frozenset[str] | None) -> bool:
        """Does a waiter of ``correlation_id`` still wait for one of ``types``?"""
        return any(
            not w.future.done() and (types is None or not types.isdisjoint(w.types))
            for w in self._waiters[correlation_id]
        )

    def _mark(self, correlations: set[str]) -> None:
        """Look ``correlations`` up (those still waited on) in the next batch."""
        self._dirty |= correlations & self._waiters.keys()
        if self._dirty and (self._checking is None or self._checking.done()):
            self._checking = asyncio.create_task(self._check(), name="vmsdb-outcomes")

    async def _check(self) -> None:
        while self._dirty:
            batch = {c: self._waiters[c] for c in self._dirty if c in self._waiters}
            self._dirty.clear()
            wanted = {c: {t for w in ws if not w.future.done() for t in w.types} for c, ws in batch.items()}
            wanted = {c: types for c, types in wanted.items() if types}
            if not wanted:
                continue
            try:
                async with self._connect() as conn:
                    found = await find_outcomes(conn, wanted)
            except Exception:  # the database went away: the waiters' own timeouts bound this
                log.exception("looking up the outcomes of %d correlation(s) failed", len(wanted))
                self._dirty |= wanted.keys()
                await asyncio.sleep(_RETRY_AFTER)
                continue
            for correlation_id, outcomes in found.items():
                for waiter in batch[correlation_id]:
                    if waiter.future.done():
                        continue
                    first = next((o for o in outcomes if o.type in waiter.types), None)
                    if first is None:
                        continue
                    try:
                        waiter.future.set_result(waiter.types[first.type].model_validate_json(first.payload))
                    except ValueError as err:  # the outcome's payload is not the type it names
                        waiter.future.set_exception(err)

    async def close(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.future.cancel()
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checking
