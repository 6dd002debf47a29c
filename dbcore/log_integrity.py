"""Definitions 1 and 3 derived from event logs alone (recovery paper §3.2).

For every reference to an entity of an event-sourced service, wherever the reference is kept (a
``vms.ref`` record of another log, or a reference column of a snapshot-storage service), the
owner's side is read from the owner's log only, never from the core's metadata:

- valid (Definition 1): ``t_j`` appears among the owner's records for the entity, in epoch
  ``k_j``, and the owner's most recent record for it (⊥ included) has ``t >= t_j``;
- otherwise a violation: ``missing`` (no record of the entity at all), ``newer`` (``t_j`` after
  its most recent record), ``lost`` (a ``t_j`` the log does not have, or has in another epoch);
- covered (Definition 3) when a ``vms.amnesia`` record of the owner's log contains ``t_j`` and
  was cut from ``k_j``'s epoch.

Local consistency: every snapshot row of an event-sourced table has a live (non-⊥) record in
the log, and every live entity of the log has its snapshot row.

References to snapshot-storage entities held in logs are the other checker's
(``integrity.check``, which reads them through ``integrity.references_in``).
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import quote_ident
from dbcore.event_logs import AMNESIA, DELETED, LogRecord, records, services_with_logs, versions
from dbcore.integrity import (
    Amnesia,
    Entity,
    IntegrityReport,
    Kind,
    LocalProblem,
    Reference,
    Repair,
    Violation,
    references_in,
    service_of,
)

__all__ = ["check_logs"]

_SNAPSHOT_TABLES = text("SELECT entity FROM vms.referenceables WHERE service = :s ORDER BY 1")


def _intervals(service: str, log: list[LogRecord]) -> list[Amnesia]:
    return [
        Amnesia(
            service,
            None,
            str(r.payload["recovery"]),
            int(r.payload["lo"]),
            int(r.payload["hi"]),
            int(r.payload["from_epoch"]),
            int(r.payload["to_epoch"]),
        )
        for r in log
        if r.type == AMNESIA
    ]


async def _local(conn: AsyncConnection, service: str, live: set[str]) -> list[LocalProblem]:
    rows: set[str] = set()
    for table in (await conn.execute(_SNAPSHOT_TABLES, {"s": service})).scalars():
        columns = await conn.execute(
            text(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = :s AND table_name = :t "
                "AND column_name IN ('key', 'state') HAVING count(*) = 2"
            ),
            {"s": service, "t": table},
        )
        if columns.first() is None:
            continue  # a snapshot-storage table of the same service
        keys = await conn.execute(text(f"SELECT key FROM {quote_ident(service)}.{quote_ident(table)}"))
        rows.update(f"vms://{service}/{table}/{k}" for k in keys.scalars())
    problems = [
        LocalProblem(service, uri, "a snapshot row with no live record in the log")
        for uri in sorted(rows - live)
    ]
    problems += [
        LocalProblem(service, uri, "a live entity of the log with no snapshot row")
        for uri in sorted(live - rows)
    ]
    return problems


async def check_logs(conn: AsyncConnection) -> IntegrityReport:
    """Definitions 1 and 3 for every reference to an event-sourced entity, from the logs."""
    owners = await services_with_logs(conn)
    logs = {s: await records(conn, s) for s in owners}
    history = {s: versions(logs[s]) for s in owners}
    intervals = {s: _intervals(s, logs[s]) for s in owners}
    local: list[LocalProblem] = []
    for s in owners:
        live = {u for u, vs in history[s].items() if vs[max(vs)][1] != DELETED}
        local += await _local(conn, s, live)
    violations: list[Violation] = []
    covered: dict[int, list[Reference]] = {}
    references = [r for r, _ in await references_in(conn) if service_of(r.uri) in history]
    for ref in sorted(references, key=lambda r: (r.holder, r.table, r.key, r.column)):
        owner = service_of(ref.uri)
        seen = history[owner].get(ref.uri, {})
        latest = max(seen, default=None)
        kind: Kind | None = None
        if latest is None:
            kind = "missing"
        elif ref.t > latest:
            kind = "newer"
        elif ref.t not in seen or seen[ref.t][0] != ref.k:
            kind = "lost"
        if kind is None:
            continue
        cover = next((a for a in intervals[owner] if a.covers(ref.t) and a.from_epoch == ref.k), None)
        entity = (
            None
            if latest is None
            else Entity(ref.uri, latest, seen[latest][0], deleted=seen[latest][1] == DELETED)
        )
        violations.append(Violation(kind, ref, entity, cover))
        if cover is not None:
            covered.setdefault(id(cover), []).append(ref)
    repairs = tuple(
        Repair(a, tuple(covered.get(id(a), ()))) for s in owners for a in intervals[s] if not a.empty
    )
    return IntegrityReport(tuple(local), tuple(violations), repairs)
