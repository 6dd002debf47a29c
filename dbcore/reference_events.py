"""The reference and recovery protocols across cores, as events (G9, G10, "beyond one machine").

A service on another core (its own Postgres) reaches the rest through Kafka, so what runs as a
function call within one core becomes a pair of events between cores:

- ``vms.ref.acquire`` / ``vms.ref.refresh`` (holder -> owner) and ``vms.ref.granted`` (back):
  the holder's row keeps ``{uri, pending, request}`` until the grant fills in the reference (or
  an ``error``). A grant nobody waits for any more is given back with ``vms.ref.release``.
- ``vms.ref.release`` (holder -> owner): ``d -= 1``.
- ``vms.recovery.amnesia`` (restored owner -> every core): each core answers for its holders of
  the restored service with ``vms.recovery.answer``, which the owner's core merges.

:func:`handle_event` applies any of them on whichever core it reaches; each kind is acted on only
by the core hosting the service concerned, so the transport may broadcast them. Run it in the
transaction that records the event as received (the ingress's), so its effect happens once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import quote_ident
from dbcore.errors import CoreError
from dbcore.eventlog import EventRecord
from dbcore.recovery import AMNESIA, ANSWER, Answer, answer, emit, local_holders, merge
from dbcore.references import delete_reference, get_reference, parse_uri

__all__ = [
    "PROTOCOL_EVENTS",
    "REF_ACQUIRE",
    "REF_GRANTED",
    "REF_REFRESH",
    "REF_RELEASE",
    "handle_event",
    "release_remote",
    "request_reference",
]

REF_ACQUIRE = "vms.ref.acquire"
REF_REFRESH = "vms.ref.refresh"
REF_RELEASE = "vms.ref.release"
REF_GRANTED = "vms.ref.granted"
#: Every event type of the two protocols: what a transport between cores must carry.
PROTOCOL_EVENTS = (REF_ACQUIRE, REF_REFRESH, REF_RELEASE, REF_GRANTED, AMNESIA, ANSWER)

_LOCAL = text("SELECT service FROM vms.ref_services")
_HOLDER_COLUMN = text(
    "SELECT key_columns FROM vms.reference_columns "
    "WHERE holder = :h AND holder_table = :t AND column_name = :c"
)


def _row_match(holder: str, table: str, keys: Sequence[str]) -> tuple[str, str]:
    qualified = f"{quote_ident(holder)}.{quote_ident(table)}"
    match = " AND ".join(f"x.{quote_ident(c)} = k.{quote_ident(c)}" for c in keys)
    return qualified, f"jsonb_populate_record(NULL::{qualified}, CAST(:key AS jsonb)) k WHERE {match}"


async def request_reference(
    conn: AsyncConnection,
    *,
    holder: str,
    table: str,
    key: Mapping[str, Any],
    column: str,
    uri: str,
    copy: bool | Sequence[str] = False,
    refresh: bool = False,
) -> str:
    """Ask another core for a reference (or a refresh), in the holder's transaction.

    The row's column holds ``{uri, pending, request}`` (a refresh keeps the current reference and
    adds ``request``) until ``vms.ref.granted`` fills it in. Returns the request id.
    """
    keys = (await conn.execute(_HOLDER_COLUMN, {"h": holder, "t": table, "c": column})).scalar_one()
    qualified, where = _row_match(holder, table, keys)
    col = quote_ident(column)
    request = str(uuid.uuid4())
    pending = {"request": request} if refresh else {"uri": uri, "pending": True, "request": request}
    value = f"x.{col} || CAST(:pending AS jsonb)" if refresh else "CAST(:pending AS jsonb)"
    result = await conn.execute(
        text(f"UPDATE {qualified} x SET {col} = {value} FROM {where}"),
        {"pending": json.dumps(pending), "key": json.dumps(key, default=str)},
    )
    if result.rowcount != 1:
        raise CoreError(f"{holder}.{table} has no row {dict(key)} to hold a reference to {uri}")
    payload = {
        "request": request,
        "uri": uri,
        "holder": holder,
        "table": table,
        "key": dict(key),
        "column": column,
        "copy": copy if isinstance(copy, bool) else list(copy),
    }
    await emit(conn, REF_REFRESH if refresh else REF_ACQUIRE, holder, payload)
    return request


async def release_remote(conn: AsyncConnection, holder: str, uri: str) -> None:
    """Give back a reference held across cores (the holder clears its column itself)."""
    await emit(conn, REF_RELEASE, holder, {"uri": uri, "holder": holder})


async def handle_event(
    conn: AsyncConnection, event_type: str, payload: Mapping[str, Any]
) -> list[EventRecord]:
    """Apply a reference or recovery event that reached this core; return the events it sent.

    Safe to call for any event, on every core: each kind is acted on only by the core that hosts
    the service concerned (the owner, the holder or the restored service). Run it in the
    transaction that records the event as received, so its effect happens once.
    """
    local = set((await conn.execute(_LOCAL)).scalars())
    if event_type in (REF_ACQUIRE, REF_REFRESH, REF_RELEASE):
        owner = parse_uri(payload["uri"])[0]
        if owner not in local:
            return []
        if event_type == REF_RELEASE:
            await delete_reference(conn, payload["uri"], holder=payload["holder"])
            return []
        reply: dict[str, Any] = {**payload, "acquire": event_type == REF_ACQUIRE}
        # A refusal (unknown, deleted, recovering) is an answer, not a failure of this event:
        # a savepoint keeps the surrounding transaction usable.
        await conn.execute(text("SAVEPOINT vms_ref"))
        try:
            ref = await get_reference(
                conn,
                payload["uri"],
                copy=payload.get("copy", False),
                holder=payload["holder"],
                count=event_type == REF_ACQUIRE,
            )
            reply["ref"] = {**ref.to_json(), "deleted": ref.deleted}
            await conn.execute(text("RELEASE SAVEPOINT vms_ref"))
        except CoreError as err:
            await conn.execute(text("ROLLBACK TO SAVEPOINT vms_ref"))
            reply["error"] = str(err)
        return [await emit(conn, REF_GRANTED, owner, reply)]
    if event_type == REF_GRANTED:
        return await _granted(conn, payload, local)
    if event_type == AMNESIA and payload["service"] not in local:
        sent = []
        for holder in await local_holders(conn, payload["service"]):
            ans = await answer(conn, payload["recovery"], payload["service"], holder)
            sent.append(await emit(conn, ANSWER, holder, ans.to_json()))
        return sent
    if event_type == ANSWER and payload["service"] in local:
        await merge(conn, Answer.from_json(payload))
    return []


async def _granted(conn: AsyncConnection, payload: Mapping[str, Any], local: set[str]) -> list[EventRecord]:
    holder = payload["holder"]
    if holder not in local:
        return []
    keys = (
        await conn.execute(_HOLDER_COLUMN, {"h": holder, "t": payload["table"], "c": payload["column"]})
    ).scalar_one()
    qualified, where = _row_match(holder, payload["table"], keys)
    col = quote_ident(payload["column"])
    if "ref" in payload:
        value, update = json.dumps(payload["ref"]), "CAST(:v AS jsonb)"
    elif payload.get("acquire"):  # refused: the row says why instead of holding a reference
        value, update = (
            json.dumps({"uri": payload["uri"], "error": payload.get("error")}),
            "CAST(:v AS jsonb)",
        )
    else:  # a refused refresh leaves the reference the row holds as it was
        value, update = "request", f"x.{col} - CAST(:v AS text)"
    result = await conn.execute(
        text(f"UPDATE {qualified} x SET {col} = {update} FROM {where} AND x.{col}->>'request' = :r"),
        {"v": value, "key": json.dumps(payload["key"]), "r": payload["request"]},
    )
    if result.rowcount == 0 and payload.get("acquire") and "ref" in payload:
        # Nobody waits for it any more (row deleted, or asked again): give the reference back.
        return [await emit(conn, REF_RELEASE, holder, {"uri": payload["uri"], "holder": holder})]
    return []
