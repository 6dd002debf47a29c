"""The recovery protocol (G10): amnesia, answers from referencing services, the replica merge.

After a restore (``backup.restore``) every entity of the service has an *amnesia interval*
``]lo, hi]`` on the owner's clock: ``lo`` is the latest time the backup is known to cover for it
(``max(t_backup, t)``), ``hi`` the tick of its first access after the restore, when its new epoch
begins (open until then). Every version stamped inside was lost. A last interval, with no URI,
covers entities the backup never knew (created after it): ``]t_backup, t_restore]``. Intervals
are part of the service's state: backed up and restored with it.

The core announces the amnesia (``vms.recovery.amnesia``). Each service holding references to the
restored one answers (:func:`answer`) with, per referenced entity, its freshest cached copy, that
reference's ``(t, k)`` and how many references it holds, or with nothing: not concerned.
:func:`merge` keeps a copy when it is newer than what the restored entity holds, from the same
epoch, and nobody has read or written the entity since the restore: a post-restore write is more
recent in real time, whatever the stamps say, and a read (by the owner, by another service's
``@Query``, or a holder's copy) began the new epoch on the value it saw (Definition 2), which a
merge must not overwrite; such a copy is kept as a conflict in the recovery's report
(``RecoveryState.conflicts``) instead. The intervals that lost it then start after it,
since it descends from every version of its epoch before it. Merging only moves intervals up, so
answers may arrive in any order. The answers also set each holder's reference count, which makes
``d`` exact again. In *consistency* mode the owner refuses writes and new references until every
expected holder answered (or the caller gives up: :func:`complete` with ``timed_out``); in
*availability* mode it serves at once, but keeps tombstones until then, since ``d`` may be low.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import quote_ident
from dbcore.event_logs import append_recovered, log_references
from dbcore.eventlog import EventRecord, append
from dbcore.integrity import references_in
from dbcore.reference_catalog import clock_sequence
from dbcore.references import parse_uri

__all__ = [
    "AMNESIA",
    "ANSWER",
    "COMPLETED",
    "Answer",
    "AnswerEntry",
    "MergeConflict",
    "Mode",
    "RecoveryState",
    "answer",
    "complete",
    "emit",
    "local_holders",
    "merge",
    "state",
]

Mode = Literal["availability", "consistency"]

AMNESIA = "vms.recovery.amnesia"
ANSWER = "vms.recovery.answer"
COMPLETED = "vms.recovery.completed"


@dataclass(frozen=True)
class AnswerEntry:
    """What one holder knows of one entity: its freshest reference (with a copy, if it has one)."""

    uri: str
    t: int
    k: int
    copy: dict[str, Any] | None
    count: int


@dataclass(frozen=True)
class Answer:
    recovery: str
    service: str
    holder: str
    entries: tuple[AnswerEntry, ...] = ()

    @property
    def concerned(self) -> bool:
        return bool(self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "recovery": self.recovery,
            "service": self.service,
            "holder": self.holder,
            "entries": [e.__dict__ for e in self.entries],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Answer:
        entries = tuple(AnswerEntry(**e) for e in data.get("entries", ()))
        return cls(str(data["recovery"]), data["service"], data["holder"], entries)


@dataclass(frozen=True)
class MergeConflict:
    """A holder's copy of a lost version that came back after the new epoch had begun on
    another value (read or written since the restore): the merge kept that value."""

    uri: str
    holder: str
    t: int
    k: int
    copy: dict[str, Any]


@dataclass(frozen=True)
class RecoveryState:
    id: str
    service: str
    mode: Mode
    epoch: int
    t_backup: int
    t_restore: int
    expected: tuple[str, ...]
    answered: tuple[str, ...]
    status: str
    merged: tuple[str, ...] = field(default=())
    #: Copies not merged because their entity was read or written in its new epoch.
    conflicts: tuple[MergeConflict, ...] = field(default=())

    @property
    def waiting_for(self) -> tuple[str, ...]:
        return tuple(h for h in self.expected if h not in self.answered)


_STATE = text("SELECT * FROM vms.recoveries WHERE id = :id")
_CONFLICTS = text(
    "SELECT uri, holder, t, k, copy FROM vms.merge_conflicts WHERE recovery_id = :id ORDER BY uri, holder"
)
_MERGED = text(
    "SELECT uri FROM vms.amnesia WHERE recovery_id = :id AND cardinality(recovered_from) > 0 ORDER BY uri"
)


async def state(conn: AsyncConnection, recovery_id: str | uuid.UUID) -> RecoveryState:
    row = (await conn.execute(_STATE, {"id": str(recovery_id)})).one()
    merged = tuple((await conn.execute(_MERGED, {"id": str(recovery_id)})).scalars())
    conflicts = tuple(
        MergeConflict(uri, holder, t, k, copy)
        for uri, holder, t, k, copy in (await conn.execute(_CONFLICTS, {"id": str(recovery_id)})).all()
    )
    return RecoveryState(
        str(row.id),
        row.service,
        row.mode,
        row.epoch,
        row.t_backup,
        row.t_restore,
        tuple(row.expected),
        tuple(row.answered),
        row.status,
        merged,
        conflicts,
    )


_HOLDERS = text(
    "SELECT DISTINCT holder FROM vms.reference_columns WHERE target_service = :s AND holder <> :s ORDER BY 1"
)


async def local_holders(conn: AsyncConnection, service: str) -> list[str]:
    """Services of this core that keep references to ``service``'s entities (in reference
    columns, or in their event logs)."""
    declared = set((await conn.execute(_HOLDERS, {"s": service})).scalars())
    logged = {r.holder for r in await log_references(conn, service=service) if r.holder != service}
    return sorted(declared | logged)


async def answer(conn: AsyncConnection, recovery_id: str, service: str, holder: str) -> Answer:
    """``holder``'s answer to the amnesia of ``service``: per entity, the freshest reference."""
    best: dict[str, AnswerEntry] = {}
    for ref, data in await references_in(conn, service=service, holder=holder):
        copy = data.get("copy")
        seen = best.get(ref.uri)
        count = 1 + (seen.count if seen else 0)
        # A reference with a copy beats one without; then the later version wins.
        rank = (copy is not None, ref.t)
        if seen is None or rank > (seen.copy is not None, seen.t):
            best[ref.uri] = AnswerEntry(ref.uri, ref.t, ref.k, copy, count)
        else:
            best[ref.uri] = AnswerEntry(seen.uri, seen.t, seen.k, seen.copy, count)
    return Answer(str(recovery_id), service, holder, tuple(best[u] for u in sorted(best)))


_ENTITY = text("SELECT * FROM vms.entities WHERE uri = :uri FOR UPDATE")
_OWN_INTERVAL = text("SELECT * FROM vms.amnesia WHERE uri = :uri AND recovery_id = :r")
# The intervals that speak for a URI (its own, or a recovery's interval for the entities it did
# not know; see integrity.amnesia_for) and contain t.
_COVERING = text(
    """
    SELECT * FROM vms.amnesia a
     WHERE a.service = :s AND a.lo < :t AND (a.hi IS NULL OR :t <= a.hi) AND a.from_epoch = :k
       AND (a.uri = :uri OR (a.uri IS NULL AND NOT EXISTS (
            SELECT 1 FROM vms.amnesia b WHERE b.uri = :uri AND b.recovery_id = a.recovery_id)))
     ORDER BY a.id FOR UPDATE
    """
)
_SET_COUNT = text(
    """
    WITH gone AS (DELETE FROM vms.entity_holders WHERE uri = :uri AND holder = :h AND :c <= 0)
    INSERT INTO vms.entity_holders (uri, holder, count) SELECT :uri, :h, :c WHERE :c > 0
    ON CONFLICT (uri, holder) DO UPDATE SET count = EXCLUDED.count
    """
)
_RECOUNT = text(
    "UPDATE vms.entities e SET d = coalesce((SELECT sum(count) FROM vms.entity_holders h "
    "WHERE h.uri = e.uri), 0) WHERE e.uri = ANY(CAST(:uris AS text[]))"
)
# Counts of this holder the answer did not mention are references it no longer has.
_FORGET = text(
    "DELETE FROM vms.entity_holders WHERE holder = :h AND starts_with(uri, 'vms://' || :s || '/') "
    "AND NOT uri = ANY(CAST(:uris AS text[])) RETURNING uri"
)
_COLUMNS = text(
    "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 "
    "AND NOT attisdropped"
)
# Columns a re-inserted row needs a value for: NOT NULL, with no default, not generated.
_REQUIRED = text(
    "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 "
    "AND NOT attisdropped AND attnotnull AND NOT atthasdef AND attidentity = '' AND attgenerated = ''"
)
_KEYS = text("SELECT key_columns FROM vms.referenceables WHERE service = :s AND entity = :e")
_MERGING = text("SELECT set_config('vms.merging', :on, true)")


async def _write_copy(conn: AsyncConnection, uri: str, copy: Mapping[str, Any]) -> list[str]:
    """Upsert the owner's row from a cached copy (its columns only); return the key columns."""
    service, entity, _ = parse_uri(uri)
    table = f"{quote_ident(service)}.{quote_ident(entity)}"
    keys = list((await conn.execute(_KEYS, {"s": service, "e": entity})).scalar_one())
    columns = [c for c in (await conn.execute(_COLUMNS, {"t": table})).scalars() if c in copy]
    names = ", ".join(quote_ident(c) for c in columns)
    updates = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in columns if c not in keys)
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    await conn.execute(
        text(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM "
            f"jsonb_populate_record(NULL::{table}, CAST(:copy AS jsonb)) "
            f"ON CONFLICT ({', '.join(quote_ident(k) for k in keys)}) {action}"
        ),
        {"copy": json.dumps(copy)},
    )
    return keys


async def _applies(conn: AsyncConnection, rec: Any, e: Any, entry: AnswerEntry) -> bool:
    """Whether a cached copy is more recent than what the restored entity holds, comparably."""
    if e is None:
        # Created after the backup and lost with the crash (a copy from before the backup would
        # bring back an entity deleted on purpose), in the backup's epoch: no restore came in
        # between, so every version of it up to the copy's is the copy's history. The row is
        # re-created from the copy, so the copy must hold every column the row cannot do
        # without; a partial copy leaves the entity in amnesia, for a person to repair.
        if not (entry.t > rec.t_backup and entry.k == rec.backup_epoch):
            return False
        service, entity, _ = parse_uri(entry.uri)
        table = f"{quote_ident(service)}.{quote_ident(entity)}"
        required = set((await conn.execute(_REQUIRED, {"t": table})).scalars())
        return required <= set(entry.copy or {})
    if e.restored_by is None or str(e.restored_by) != str(rec.id):
        return False  # written or read since the restore: the new epoch began on that value
    own = (await conn.execute(_OWN_INTERVAL, {"uri": entry.uri, "r": str(rec.id)})).one_or_none()
    return (
        own is not None
        and own.lo < entry.t
        and (own.hi is None or entry.t <= own.hi)
        # Comparable epochs: within one epoch an entity's versions form one chain, so the copy
        # descends from every version between the restored one and itself. A copy from a later
        # epoch may not (a restore the backup never saw lost some of them): it stays in amnesia.
        and entry.k == own.from_epoch
    )


async def _superseded(conn: AsyncConnection, rec: Any, e: Any, entry: AnswerEntry) -> bool:
    """Whether a copy would have been merged had the entity not been read or written since the
    restore: it is a version this recovery lost, but the new epoch has begun on another value.
    """
    if e is None or e.restored_by is not None:
        return False
    own = (await conn.execute(_OWN_INTERVAL, {"uri": entry.uri, "r": str(rec.id)})).one_or_none()
    return (
        own is not None
        and own.hi is not None
        and own.lo < entry.t <= own.hi
        and entry.k == own.from_epoch
    )


_CONFLICT = text(
    "INSERT INTO vms.merge_conflicts (recovery_id, uri, holder, service, t, k, copy) "
    "VALUES (:r, :uri, :h, :s, :t, :k, CAST(:copy AS jsonb)) ON CONFLICT DO NOTHING"
)


async def _apply(conn: AsyncConnection, rec: Any, holder: str, e: Any, entry: AnswerEntry) -> None:
    assert entry.copy is not None
    service, entity, _ = parse_uri(entry.uri)
    keys = await _write_copy(conn, entry.uri, entry.copy)
    if len(keys) == 1:  # an event-sourced entity's log records the version brought back
        key = entry.copy.get(keys[0])
        await append_recovered(conn, service, entity, str(key), entry.uri, entry.t, entry.k, entry.copy)
    params: dict[str, Any] = {"uri": entry.uri, "s": service, "r": str(rec.id), "h": holder}
    if e is None:
        await conn.execute(
            text(
                "INSERT INTO vms.entities (uri, service, entity, key, t, k, pending, restored_by) "
                "VALUES (:uri, :s, :e, CAST(:key AS jsonb), :t, :k, true, :r)"
            ),
            {
                **params,
                "e": entity,
                "t": entry.t,
                "k": entry.k,
                "key": json.dumps({c: entry.copy.get(c) for c in keys}),
            },
        )
        await conn.execute(
            text(
                "INSERT INTO vms.amnesia (service, uri, recovery_id, from_epoch, to_epoch, lo, "
                "recovered_from) VALUES (:s, :uri, :r, :k, :epoch, :t, ARRAY[CAST(:h AS text)])"
            ),
            {**params, "k": entry.k, "epoch": rec.epoch, "t": entry.t},
        )
    else:
        # Untouched since the restore, the entity takes the copy's stamp; referenced since with
        # no copy (its stamp moved past hi, its value unseen), the copy becomes a new version.
        stamp = (entry.t, entry.k) if e.pending else (await _tick(conn, service), rec.epoch)
        await conn.execute(
            text("UPDATE vms.entities SET t = :t, k = :k, deleted = false, value = NULL WHERE uri = :uri"),
            {**params, "t": stamp[0], "k": stamp[1]},
        )
    # Every version of the copy's epoch up to it is known again (they are its history): each
    # interval of that epoch that lost the copy's version now starts after it, including older
    # restores' intervals. Intervals of other epochs keep what they lost.
    for a in (await conn.execute(_COVERING, {**params, "t": entry.t, "k": entry.k})).all():
        if a.uri is not None:
            await conn.execute(
                text(
                    "UPDATE vms.amnesia SET lo = :t, recovered_from = array_append(recovered_from, "
                    "CAST(:h AS text)) WHERE id = :id"
                ),
                {"t": entry.t, "h": holder, "id": a.id},
            )
        else:
            await conn.execute(
                text(
                    "INSERT INTO vms.amnesia (service, uri, recovery_id, from_epoch, to_epoch, lo, hi, "
                    "recovered_from) VALUES (:s, :uri, :ar, :f, :to, :t, :hi, ARRAY[CAST(:h AS text)])"
                ),
                {
                    **params,
                    "ar": a.recovery_id,
                    "f": a.from_epoch,
                    "to": a.to_epoch,
                    "t": entry.t,
                    "hi": a.hi,
                },
            )


async def merge(conn: AsyncConnection, ans: Answer) -> list[str]:
    """Apply one holder's answer to the restored service (administrator); return merged URIs.

    Idempotent and order-independent. Completes the recovery when it was the last one awaited.
    """
    rec = (await conn.execute(text(_STATE.text + " FOR UPDATE"), {"id": ans.recovery})).one_or_none()
    if rec is None:
        return []
    later = await conn.execute(
        text("SELECT 1 FROM vms.recoveries WHERE service = :s AND started_at > :at"),
        {"s": ans.service, "at": rec.started_at},
    )
    if later.first() is not None:
        return []  # an answer to a recovery that a later restore superseded
    merged: list[str] = []
    await conn.execute(_MERGING, {"on": "on"})  # the trigger must not stamp merged rows
    for entry in ans.entries:
        e = (await conn.execute(_ENTITY, {"uri": entry.uri})).one_or_none()
        if entry.copy is not None and await _applies(conn, rec, e, entry):
            await _apply(conn, rec, ans.holder, e, entry)
            merged.append(entry.uri)
        elif entry.copy is not None and await _superseded(conn, rec, e, entry):
            await conn.execute(
                _CONFLICT,
                {
                    "r": str(rec.id),
                    "uri": entry.uri,
                    "h": ans.holder,
                    "s": ans.service,
                    "t": entry.t,
                    "k": entry.k,
                    "copy": json.dumps(entry.copy),
                },
            )
        await conn.execute(_SET_COUNT, {"uri": entry.uri, "h": ans.holder, "c": entry.count})
    await conn.execute(_MERGING, {"on": "off"})
    mentioned = [x.uri for x in ans.entries]
    forgotten = (
        await conn.execute(_FORGET, {"s": ans.service, "h": ans.holder, "uris": mentioned})
    ).scalars()
    await conn.execute(_RECOUNT, {"uris": mentioned + list(forgotten)})
    answered = sorted({*rec.answered, ans.holder})
    await conn.execute(
        text("UPDATE vms.recoveries SET answered = CAST(:a AS text[]) WHERE id = :id"),
        {"a": answered, "id": ans.recovery},
    )
    if rec.status == "recovering" and set(rec.expected) <= set(answered):
        await complete(conn, ans.recovery)
    return merged


async def _tick(conn: AsyncConnection, service: str) -> int:
    return int((await conn.execute(text(f"SELECT nextval('{clock_sequence(service)}')"))).scalar_one())


_SERVE = text(
    "UPDATE vms.ref_services SET recovering = NULL, recovery_id = NULL "
    "WHERE service = :s AND recovery_id = :id"
)
# Only once every holder answered are the counts exact: then tombstones nothing references go.
_UNREFERENCED = text("SELECT uri FROM vms.entities WHERE service = :s AND deleted AND d <= 0 ORDER BY uri")


async def complete(conn: AsyncConnection, recovery_id: str, *, timed_out: bool = False) -> None:
    """End a recovery: the service serves normally again (administrator). Idempotent."""
    rec = (await conn.execute(_STATE, {"id": recovery_id})).one()
    if rec.status != "recovering":
        return
    status = "timed_out" if timed_out else "completed"
    await conn.execute(
        text("UPDATE vms.recoveries SET status = :st, completed_at = now() WHERE id = :id"),
        {"st": status, "id": recovery_id},
    )
    await conn.execute(_SERVE, {"s": rec.service, "id": recovery_id})
    if not timed_out:
        for uri in (await conn.execute(_UNREFERENCED, {"s": rec.service})).scalars().all():
            await conn.execute(text("SELECT vms.ref_forget(:u)"), {"u": uri})
            await conn.execute(text("DELETE FROM vms.entity_holders WHERE uri = :u"), {"u": uri})
    await emit(
        conn, COMPLETED, rec.service, {"recovery": recovery_id, "service": rec.service, "status": status}
    )


async def emit(
    conn: AsyncConnection, event_type: str, producer: str, payload: Mapping[str, Any]
) -> EventRecord:
    record = EventRecord(
        id=uuid.uuid4(),
        type=event_type,
        key=str(payload.get("uri") or payload.get("service") or ""),
        payload=json.dumps(payload, default=str),
        producer=producer,
    )
    await append(conn, [record])
    return record
