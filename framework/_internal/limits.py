"""``ServiceLimits``: what one virtual microservice may use of the core it shares with others.

```python
class Stock(Service, name="stock",
            limits=ServiceLimits(concurrency=8, connections=10, statement_timeout=timedelta(seconds=2))):
    ...
```

Each limit is enforced as far down as it can be:

- ``statement_timeout``: the service role's ``statement_timeout`` (``ALTER ROLE ... SET``, at
  registration), so Postgres cancels any statement of any of the role's logins that runs longer,
  in every process; the framework reports it as ``StatementTimeout`` naming the service and limit;
- ``connections``: the service role's ``CONNECTION LIMIT`` (Postgres refuses the connection
  beyond it, across processes: ``ConnectionLimitReached``) and the cap of the App's pool for it;
- ``concurrency``: :class:`Slots`, in each App: at most that many of the service's handlers and
  direct calls run at once; the others wait for a slot *before* checking out a connection.

No limits (the default) is today's behaviour; removing a limit resets the role at the next start.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from dbcore.descriptor import LimitsDescriptor

__all__ = ["ServiceLimits", "Slots"]


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """Limits of one service; every field optional (``None``: unlimited).

    Checked where it is given, ``class X(Service, limits=...)``: a value that is not positive is
    an ``AnnotationError`` naming the service.
    """

    concurrency: int | None = None
    connections: int | None = None
    statement_timeout: timedelta | None = None

    def problem(self) -> str | None:
        """What is wrong with these limits, or ``None``."""
        for name in ("concurrency", "connections"):
            value = getattr(self, name)
            whole = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and not (whole and value >= 1):
                return f"limits: {name} must be a positive integer or None, got {value!r}"
        timeout = self.statement_timeout
        one_ms = timedelta(milliseconds=1)
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout < one_ms):
            return f"limits: statement_timeout must be a timedelta of at least 1 ms or None, got {timeout!r}"
        return None

    def descriptor(self) -> LimitsDescriptor:
        timeout = self.statement_timeout
        milliseconds = None if timeout is None else max(1, round(timeout / timedelta(milliseconds=1)))
        return LimitsDescriptor(
            concurrency=self.concurrency, connections=self.connections, statement_timeout_ms=milliseconds
        )


class Slots:
    """At most ``size`` holders at once; waiters are served first come, first served.

    Shared, in one App, by a service's direct calls (``await acquire()``) and its handler
    workers (``try_acquire()``: a worker never waits here, it runs another service's job).
    ``on_release`` tells the workers a slot is free.
    """

    def __init__(self, size: int, on_release: Callable[[], None] | None = None) -> None:
        self.size = size
        self.running = 0
        self.on_release = on_release
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        if self.running >= self.size or self._waiters:
            return False
        self.running += 1
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as it was cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """``async with slots.held():`` one slot, waited for, for the block."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        while self._waiters:  # hand the slot straight to the oldest waiter
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
        if self.on_release is not None:
            self.on_release()
