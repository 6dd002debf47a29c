"""The transactional outbox, framework side: ``Event`` objects into log records.

Events a function sends are kept in its ``TxContext`` and written in one statement just before
the transaction commits, in the same transaction as the function's state (G2). That statement
travels in the ``COMMIT`` message itself (``OutboxCommit``): sending events costs no round trip
(and, on a service's login, no planning either: ``dbcore.outbox``).
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import PoolProxiedConnection

from dbcore.eventlog import EventRecord, append
from dbcore.isolation import CommitStatement
from dbcore.outbox import commit_sql, forget_outbox, hand_offs, handed_off
from framework._internal import telemetry
from framework._internal.context import TxContext
from framework._internal.events import Event
from framework._internal.handoff import HandOff, Planned

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
    """What a function's transaction sends with its ``COMMIT``: ``inner`` (the delivery's
    acknowledgement, for a handler), then its outbox, in one message. The outbox may ask for a
    hand-off to this App's own subscribers (``handoff``, see ``framework._internal.handoff``),
    which get what the fan-out claimed once the transaction committed.

    An error in either ends the message before ``COMMIT``, and the transaction rolls back with
    its state (G2); ``inner`` translates its own errors.
    """

    __slots__ = ("_handoff", "_inner", "_outbox", "_planned", "_pooled")

    def __init__(self, inner: CommitStatement | None, handoff: HandOff | None = None) -> None:
        self._inner = inner
        self._handoff = handoff
        self._outbox = ""
        self._pooled: PoolProxiedConnection | None = None
        self._planned: Planned | None = None

    async def write(self, conn: AsyncConnection, ctx: TxContext) -> None:
        """Take ``ctx``'s outbox along with the commit (or, when a value cannot be inlined,
        write it now)."""
        await self.write_records(conn, records_of(ctx))

    async def write_records(self, conn: AsyncConnection, records: list[EventRecord]) -> None:
        """Take ``records`` along with the commit (or, when a value cannot be inlined, write
        them now)."""
        pooled = await conn.get_raw_connection()
        marked, planned = records, None
        if self._handoff is not None and hand_offs(pooled):
            handed_off(pooled)  # forget what an earlier transaction left (none should)
            marked, planned = self._handoff.plan(records)
        try:
            self._outbox = commit_sql(pooled, marked)
        except ValueError:
            await append(conn, records)  # written now: too early to know about a hand-off
        else:
            self._pooled = pooled
            self._planned = planned

    @property
    def sql(self) -> str:
        # The acknowledgement first: the fan-out of the outbox then no longer sees the handled
        # delivery as one waiting ahead of a hand-off of the same key to the same subscriber.
        inner = "" if self._inner is None else self._inner.sql
        return "; ".join(s for s in (inner, self._outbox) if s)

    def translate(self, err: BaseException) -> BaseException | None:
        # Sees whatever ended the transaction: where a connection learns its statement is gone.
        if self._pooled is not None:
            forget_outbox(self._pooled, err)
        return None if self._inner is None else self._inner.translate(err)

    def hand_off(self) -> None:
        """After the commit: give what the fan-out claimed to this App's workers."""
        if self._planned is not None and self._pooled is not None:
            assert self._handoff is not None
            self._handoff.deliver(self._planned, handed_off(self._pooled))
