"""The outbox as it travels in a transaction's ``COMMIT`` message (database side).

A service's events are written by one statement sent in the same message as ``COMMIT``, so
sending them costs no round trip of their own. That message uses the simple-query protocol,
which takes no parameters: the values are inlined as literals.

On a connection of a service's login the statement is ``EXECUTE vms_outbox(...)``, a statement
the connection prepared when its pool opened it (:func:`prepare_outbox`): Postgres plans the
insert once per connection rather than once per transaction. Planning it is not cheap (the
``own_events`` row-level security policy and its ``EXISTS`` come with it): as an inlined
``INSERT`` it cost the server 75-110 µs of the 350-380 µs of CPU of a read-modify-write that
sends one event (2 vCPUs). Any other connection (the administrator's, with ``SET LOCAL ROLE``)
inlines the ``INSERT``.

Such a connection also hears the fan-out's NOTICE that its transaction handed deliveries off
(``eventlog.FAN_OUT_FUNCTION``): the notice arrives in the reply to the ``COMMIT`` message,
before ``COMMIT``'s own answer, so telling the producer costs no statement either
(:func:`hand_offs`, :func:`handed_off`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection

from dbcore.eventlog import HANDED_OFF_SQLSTATE, INSERT_EVENTS, EventRecord

__all__ = [
    "OUTBOX_STATEMENT",
    "append_sql",
    "commit_sql",
    "forget_outbox",
    "hand_offs",
    "handed_off",
    "prepare_outbox",
]

log = logging.getLogger("vmsdb.outbox")

#: The name of the prepared outbox statement on a service login's connections.
OUTBOX_STATEMENT = "vms_outbox"
#: Postgres's "prepared statement does not exist" (someone ran ``DEALLOCATE`` or ``DISCARD``).
_NO_SUCH_STATEMENT = "26000"
# Key of the pooled connection's ``info``: the outbox statement is prepared on it.
_PREPARED = "vms.outbox_prepared"
_COLUMN_TYPES = ("uuid", "text", "text", "text", "text", "text", "uuid", "text", "text", "text", "uuid")
_PREPARE = (
    f"PREPARE {OUTBOX_STATEMENT} ({', '.join(f'{t}[]' for t in _COLUMN_TYPES)}) AS {INSERT_EVENTS}"
)
_COLUMNS = (
    "id, type, key, payload, producer, correlation_id, causation_id, origin, trace_context, handoff_to, "
    "handoff_claim"
)


def _literal(value: str | uuid.UUID | None) -> str:
    """An escape-string literal: read the same whatever ``standard_conforming_strings`` says
    (a payload's JSON holds backslashes, which a plain '...' literal reads as escapes when it
    is off)."""
    if value is None:
        return "NULL"
    text_ = str(value)
    if "\x00" in text_:
        raise ValueError("a SQL literal cannot hold a NUL character")
    return "E'" + text_.replace("\\", "\\\\").replace("'", "''") + "'"


def _columns(r: EventRecord) -> tuple[str | uuid.UUID | None, ...]:
    return (
        r.id, r.type, r.key, r.payload, r.producer, r.correlation_id, r.causation_id, r.origin,
        r.trace_context, r.handoff_to, r.handoff_claim,
    )  # fmt: skip


def append_sql(records: Sequence[EventRecord]) -> str:
    """``eventlog.append`` as one ``INSERT`` with its values inlined. Raises ``ValueError`` for
    a value no SQL literal can hold (a NUL character); ``eventlog.append`` takes any."""
    rows = ",".join(
        f"({_literal(r.id)}::uuid,{_literal(r.type)},{_literal(r.key)},{_literal(r.payload)}::jsonb,"
        f"{_literal(r.producer)},{_literal(r.correlation_id)},{_literal(r.causation_id)}::uuid,"
        f"{_literal(r.origin)},{_literal(r.trace_context)},{_literal(r.handoff_to)},"
        f"{_literal(r.handoff_claim)}::uuid)"
        for r in records
    )
    return f"INSERT INTO vms.events ({_COLUMNS}) VALUES {rows}"


# The EXECUTE with one placeholder per column, each filled with that column's values.
_EXECUTE = f"EXECUTE {OUTBOX_STATEMENT}(" + ", ".join(f"ARRAY[{{}}]::{t}[]" for t in _COLUMN_TYPES) + ")"


def _execute_sql(records: Sequence[EventRecord]) -> str:
    """The prepared statement's ``EXECUTE``: one array literal per column, one element per event."""
    if len(records) == 1:  # most transactions send one event
        return _EXECUTE.format(*map(_literal, _columns(records[0])))
    rows = [_columns(r) for r in records]
    return _EXECUTE.format(*(",".join(_literal(row[i]) for row in rows) for i in range(len(_COLUMN_TYPES))))


def commit_sql(pooled: PoolProxiedConnection, records: Sequence[EventRecord]) -> str:
    """The statement that writes ``records``, to be sent in ``pooled``'s ``COMMIT`` message:
    the prepared statement's ``EXECUTE`` where ``pooled`` has it, else the inlined ``INSERT``.
    Raises ``ValueError`` for a value no SQL literal can hold (a NUL character)."""
    return _execute_sql(records) if pooled.info.get(_PREPARED) else append_sql(records)


def forget_outbox(pooled: PoolProxiedConnection, err: BaseException) -> None:
    """After ``err`` ended a ``COMMIT`` message: if the prepared statement was gone (a
    ``DEALLOCATE`` or ``DISCARD`` in the transaction), the connection inlines its outbox from
    now on."""
    orig = getattr(err, "orig", err)
    if getattr(orig, "sqlstate", None) == _NO_SUCH_STATEMENT and f'"{OUTBOX_STATEMENT}"' in str(orig):
        pooled.info.pop(_PREPARED, None)


# Keys of the pooled connection's ``info``: it hears the fan-out's hand-off notices, and how
# many deliveries they said were handed off since the producer last asked.
_HEARS_HAND_OFFS = "vms.hears_hand_offs"
_HANDED_OFF = "vms.handed_off"


def hand_offs(pooled: PoolProxiedConnection) -> bool:
    """Whether ``pooled`` hears the fan-out's hand-off notices (:func:`handed_off` counts them):
    only then may its transactions ask for a hand-off."""
    return bool(pooled.info.get(_HEARS_HAND_OFFS))


def handed_off(pooled: PoolProxiedConnection) -> int:
    """How many deliveries the fan-out handed off on ``pooled`` since the last call. Read once
    the ``COMMIT`` message's reply is in: its notices were dispatched before that reply."""
    return int(pooled.info.pop(_HANDED_OFF, 0))


def _hear_hand_offs(driver: Any, info: dict[str, Any]) -> None:
    def noticed(_conn: object, message: Any) -> None:
        # asyncpg hands a notice to its listeners with call_soon, as it reads it: before it
        # resolves the query that the rest of the same reply ends.
        if getattr(message, "sqlstate", None) == HANDED_OFF_SQLSTATE:
            info[_HANDED_OFF] = info.get(_HANDED_OFF, 0) + int(message.detail)

    driver.add_log_listener(noticed)
    info[_HEARS_HAND_OFFS] = True


def _prepare(dbapi_connection: Any, record: Any) -> None:
    # Notices reach this client whatever the server's or the role's default says.
    setup = f"{_PREPARE}; SET client_min_messages TO notice"
    try:
        dbapi_connection.run_async(lambda driver: driver.execute(setup))
    except Exception as err:  # no catalog (yet): this connection inlines its outbox
        log.debug("the outbox statement is not prepared on a new connection: %s", err)
        return
    record.info[_PREPARED] = True
    _hear_hand_offs(dbapi_connection.driver_connection, record.info)


def prepare_outbox(engine: AsyncEngine) -> None:
    """Prepare the outbox statement on each connection ``engine``'s pool opens (a service's
    login, which runs only that service's transactions)."""
    event.listen(engine.sync_engine, "connect", _prepare)
