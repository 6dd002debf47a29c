"""The running transaction, reachable from anywhere in a service function: ``session()``,
``connection()``, ``send()``.

A ``ContextVar`` holds the transaction of the current task, so concurrent handlers in one process
never see each other's session, and a nested call to another ``@Transactional`` function of the
same service finds the outer transaction and joins it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from framework._internal.errors import NoTransactionError, UndeclaredEventError
from framework._internal.events import Event

__all__ = ["TxContext", "connection", "correlate", "correlation", "current", "send", "session"]


@dataclass(eq=False)
class TxContext:
    """One running transaction of one service."""

    service: str
    function: str
    connection: AsyncConnection
    read_only: bool
    allowed: frozenset[type[Event]]
    correlation_id: str | None = None
    causation_id: str | None = None
    outbox: list[Event] = field(default_factory=list)
    _session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        # Created on first use: a handler that never touches the ORM pays nothing for it.
        if self._session is None:
            self._session = AsyncSession(bind=self.connection, expire_on_commit=False, autoflush=True)
        return self._session

    @property
    def has_session(self) -> bool:
        return self._session is not None

    def send(self, event: Event) -> None:
        if type(event) not in self.allowed:
            if not isinstance(event, Event):
                raise UndeclaredEventError(
                    f"{self.function} sent {event!r}, which is not an Event; send() takes an Event"
                )
            declared = ", ".join(sorted(t.__name__ for t in self.allowed)) or "none"
            raise UndeclaredEventError(
                f"{self.function} sent {type(event).__name__}, which its @Outbound does not "
                f"declare (declared: {declared}); the transaction is rolled back"
            )
        self.outbox.append(event)


_current: ContextVar[TxContext | None] = ContextVar("vmsdb_transaction", default=None)


def current() -> TxContext | None:
    return _current.get()


def _require(what: str) -> TxContext:
    ctx = _current.get()
    if ctx is None:
        raise NoTransactionError(
            f"{what} is only available inside a @Transactional (or @Inbound/@Outbound) function "
            "of a service running in an App"
        )
    return ctx


def session() -> AsyncSession:
    """The ``AsyncSession`` of the running transaction; it commits when the function returns."""
    return _require("session()").session


def connection() -> AsyncConnection:
    """The SQLAlchemy ``AsyncConnection`` of the running transaction, for Core statements.

    Statements on it skip the ORM's unit of work, which makes them several times cheaper than
    ``session()`` for simple reads and writes. They run in the same transaction as the session,
    under the same role, but the session does not flush before them: call
    ``await session().flush()`` first when both are used and the order matters. For the
    driver itself: ``(await connection().get_raw_connection()).driver_connection`` (asyncpg).
    """
    return _require("connection()").connection


def send(event: Event) -> None:
    """Send ``event`` in the running transaction: it is committed with the state, or not at all.

    Raises ``UndeclaredEventError`` (and the transaction rolls back) when the function did not
    declare the event's type with ``@Outbound``.
    """
    _require("send()").send(event)


def bind(ctx: TxContext | None) -> Any:
    return _current.set(ctx)


def unbind(token: Any) -> None:
    _current.reset(token)


#: The correlation id (business transaction id, e.g. the eShop's instanceId) of the current task.
#: Events sent while it is set carry it; handlers run with the correlation of their event.
correlation: ContextVar[str | None] = ContextVar("vmsdb_correlation", default=None)


class correlate:
    """``with correlate(tid): ...``: calls and events inside carry correlation id ``tid``."""

    def __init__(self, correlation_id: str) -> None:
        self.correlation_id = correlation_id
        self._token: Any = None

    def __enter__(self) -> str:
        self._token = correlation.set(self.correlation_id)
        return self.correlation_id

    def __exit__(self, *exc: object) -> None:
        correlation.reset(self._token)
