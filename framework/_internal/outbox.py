"""The transactional outbox, framework side: ``Event`` objects into log records.

Events a function sends are kept in its ``TxContext`` and written in one statement just before
the transaction commits, in the same transaction as the function's state (G2).
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.eventlog import EventRecord, append
from framework._internal import telemetry
from framework._internal.context import TxContext
from framework._internal.events import Event

__all__ = ["record_of", "write_outbox"]


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


async def write_outbox(conn: AsyncConnection, ctx: TxContext) -> None:
    await append(
        conn,
        [
            record_of(
                e,
                producer=ctx.service,
                correlation_id=ctx.correlation_id,
                causation_id=ctx.causation_id,
            )
            for e in ctx.outbox
        ],
    )
