"""The transactional outbox, framework side: ``Event`` objects into log records.

Events a function sends are kept in its ``TxContext`` and written in one statement just before
the transaction commits, in the same transaction as the function's state (G2). That statement
travels in the ``COMMIT`` message itself (``OutboxCommit``): sending events costs no round trip.
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.eventlog import EventRecord, append, append_sql
from dbcore.isolation import CommitStatement
from framework._internal import telemetry
from framework._internal.context import TxContext
from framework._internal.events import Event

__all__ = ["OutboxCommit", "record_of", "records_of"]


def record_of(
    event: Event,
    *,
    producer: str | None,
    correlation_id: str | None,
    causation_id: uuid.UUID | str | None,
    event_id: uuid.UUID | None = None,
) -> EventRecord:
    causation = uuid.UUID(causation_id) if isinstance(causation_id, str) else causation_id
    return EventRecord(
        id=event_id or uuid.uuid4(),
        type=event.__event_type__,
        key=event.partition_key(),
        payload=event.model_dump_json(),
        producer=producer,
        correlation_id=correlation_id,
        causation_id=causation,
        trace_context=telemetry.traceparent(),
    )


def records_of(ctx: TxContext) -> list[EventRecord]:
    """The log records of the events ``ctx``'s function sent."""
    return [
        record_of(e, producer=ctx.service, correlation_id=ctx.correlation_id, causation_id=ctx.causation_id)
        for e in ctx.outbox
    ]


class OutboxCommit:
    """What a function's transaction sends with its ``COMMIT``: its outbox, then ``inner`` (the
    delivery's acknowledgement, for a handler), in one message.

    An error in either ends the message before ``COMMIT``, and the transaction rolls back with
    its state (G2); ``inner`` translates its own errors.
    """

    __slots__ = ("_inner", "_outbox")

    def __init__(self, inner: CommitStatement | None) -> None:
        self._inner = inner
        self._outbox = ""

    async def write(self, conn: AsyncConnection, ctx: TxContext) -> None:
        """Take ``ctx``'s outbox along with the commit (or, when a value cannot be inlined,
        write it now)."""
        await self.write_records(conn, records_of(ctx))

    async def write_records(self, conn: AsyncConnection, records: list[EventRecord]) -> None:
        """Take ``records`` along with the commit (or, when a value cannot be inlined, write
        them now)."""
        try:
            self._outbox = append_sql(records)
        except ValueError:
            await append(conn, records)

    @property
    def sql(self) -> str:
        inner = "" if self._inner is None else self._inner.sql
        return "; ".join(s for s in (self._outbox, inner) if s)

    def translate(self, err: BaseException) -> BaseException | None:
        return None if self._inner is None else self._inner.translate(err)
