"""Event-sourced services' logs (recovery paper §3.2): what the core reads and writes in them.

A service whose entities are event-sourced keeps an append-only log, table ``<service>.es_log``
(``seq, t, k, entity, key, uri, type, payload``; ``framework.event_sourcing`` writes it). The
paper's mechanism lives in it:

- an entity's events carry the version ``(t, k)`` they made; ⊥ is a ``vms.deleted`` record;
- a reference is a ``vms.ref`` record of the holder, ``payload.ref = {uri, t, k[, copy]}``, and
  ``vms.unref`` (``payload.of = seq``) gives it back: the references live in the log, not in a
  column, so :func:`log_references` is where the core finds them (answers, recounts, checkers);
- a restore appends ``vms.amnesia`` (``payload = {recovery, lo, hi, from_epoch, to_epoch}``): the
  versions stamped in ``]lo, hi]`` were lost; a merge appends ``vms.recovered`` with the lost
  version's own ``(t, k)`` and the holder's copy.

:func:`check_logs` derives Definition 1 and Definition 3 for references to event-sourced
entities from the logs alone: a reference ``(URI^e, t_j, k_j)`` is valid when ``t_j`` appears
among the owner's records for ``e`` and the owner's most recent record for ``e`` (⊥ included) has
``t >= t_j``; an invalid one is covered when an amnesia record of the owner's log contains
``t_j`` in ``k_j``'s epoch.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import quote_ident

__all__ = [
    "AMNESIA",
    "DELETED",
    "LOG_TABLE",
    "RECOVERED",
    "REF",
    "UNREF",
    "LogRecord",
    "LoggedReference",
    "append_amnesia",
    "append_recovered",
    "has_log",
    "log_references",
    "records",
    "services_with_logs",
]

LOG_TABLE = "es_log"
DELETED = "vms.deleted"
REF = "vms.ref"
UNREF = "vms.unref"
AMNESIA = "vms.amnesia"
RECOVERED = "vms.recovered"


def _log(service: str) -> str:
    return f"{quote_ident(service)}.{quote_ident(LOG_TABLE)}"


_SERVICES = text(
    "SELECT s.service FROM vms.ref_services s "
    "WHERE to_regclass(format('%I.%I', s.service, CAST(:log AS text))) IS NOT NULL ORDER BY 1"
)


async def services_with_logs(conn: AsyncConnection) -> list[str]:
    """The services of this core that keep an event log."""
    return list((await conn.execute(_SERVICES, {"log": LOG_TABLE})).scalars())


async def has_log(conn: AsyncConnection, service: str) -> bool:
    found = await conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": _log(service)})
    return bool(found.scalar())


@dataclass(frozen=True)
class LogRecord:
    seq: int
    t: int
    k: int
    uri: str
    type: str
    payload: dict[str, Any]


async def records(conn: AsyncConnection, service: str) -> list[LogRecord]:
    """``service``'s whole log, in append order."""
    rows = await conn.execute(text(f"SELECT seq, t, k, uri, type, payload FROM {_log(service)} ORDER BY seq"))
    return [LogRecord(*row) for row in rows.all()]


@dataclass(frozen=True)
class LoggedReference:
    """A reference recorded in a holder's log and not given back: its record and what it saw."""

    holder: str
    seq: int
    holder_uri: str
    data: dict[str, Any]  # {uri, t, k[, copy]}


async def log_references(
    conn: AsyncConnection, service: str | None = None, holder: str | None = None
) -> list[LoggedReference]:
    """References held in event logs (to ``service``'s entities, by ``holder``, if given)."""
    found = []
    for h in await services_with_logs(conn):
        if holder is not None and h != holder:
            continue
        released = {int(r.payload["of"]) for r in await records(conn, h) if r.type == UNREF}
        for r in await records(conn, h):
            if r.type != REF or r.seq in released:
                continue
            data = r.payload["ref"]
            if service is None or str(data["uri"]).startswith(f"vms://{service}/"):
                found.append(LoggedReference(h, r.seq, r.uri, data))
    return found


_APPEND = (
    "INSERT INTO {log} (t, k, entity, key, uri, type, payload) "
    "VALUES (:t, :k, :entity, :key, :uri, :type, CAST(:payload AS jsonb))"
)


async def append_amnesia(
    conn: AsyncConnection, service: str, *, recovery: str, lo: int, hi: int, from_epoch: int, to_epoch: int
) -> None:
    """Record a restore's lost interval in ``service``'s log (administrator, in the restore)."""
    if not await has_log(conn, service):
        return
    payload = {"recovery": recovery, "lo": lo, "hi": hi, "from_epoch": from_epoch, "to_epoch": to_epoch}
    await conn.execute(
        text(_APPEND.format(log=_log(service))),
        {
            "t": hi,
            "k": to_epoch,
            "entity": "",
            "key": "",
            "uri": "",
            "type": AMNESIA,
            "payload": json.dumps(payload),
        },
    )


async def append_recovered(
    conn: AsyncConnection, service: str, entity: str, key: str, uri: str, t: int, k: int, copy: dict[str, Any]
) -> None:
    """Record a lost version brought back from a holder's copy, with its own ``(t, k)``."""
    if not await has_log(conn, service):
        return
    await conn.execute(
        text(_APPEND.format(log=_log(service))),
        {
            "t": t,
            "k": k,
            "entity": entity,
            "key": key,
            "uri": uri,
            "type": RECOVERED,
            "payload": json.dumps(copy),
        },
    )


def versions(log: list[LogRecord]) -> dict[str, dict[int, tuple[int, str]]]:
    """Per entity URI, its records' versions: ``t -> (k, type)``."""
    found: dict[str, dict[int, tuple[int, str]]] = defaultdict(dict)
    for r in log:
        if r.uri and r.type not in (REF, UNREF, AMNESIA):
            found[r.uri][r.t] = (r.k, r.type)
    return found
