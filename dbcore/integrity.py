"""Definitions 1 and 3 as checkers: global and weak global referential integrity.

Pure functions over an :class:`IntegritySnapshot`, so the same code judges the core (loaded by
:func:`load_snapshot` in one snapshot) and a model of the paper in the tests.

- Definition 1 (global consistency): every service is locally consistent (its metadata agrees
  with its tables and with the references it holds) and every reference ``(uri, t, k)`` is valid:
  the entity exists (a tombstone counts), ``k`` is not ahead of its epoch, ``t`` not ahead of its
  ``t``, and no amnesia interval of the entity contains ``t``.
- Definition 3 (weak global consistency): locally consistent, and every reference that is not
  valid falls in an amnesia interval. The intervals, each with the references inside it, are the
  list of what needs manual repair.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import quote_ident
from dbcore.event_logs import LOG_TABLE, log_references
from dbcore.references import uri_expression

__all__ = [
    "Amnesia",
    "Entity",
    "IntegrityReport",
    "IntegritySnapshot",
    "LocalProblem",
    "Reference",
    "Repair",
    "Violation",
    "amnesia_for",
    "check",
    "count_problems",
    "load_snapshot",
    "references_in",
    "service_of",
    "stored_references",
]


def service_of(uri: str) -> str:
    return uri[len("vms://") :].split("/", 1)[0]


# -- the model the checkers read ---------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """An entity's metadata as its owner keeps it."""

    uri: str
    t: int
    k: int
    d: int = 0
    deleted: bool = False
    pending: bool = False

    @property
    def service(self) -> str:
        return service_of(self.uri)


@dataclass(frozen=True)
class Reference:
    """One stored reference: the holder's end (service, table, row key, column) and what it saw."""

    holder: str
    table: str
    key: str
    column: str
    uri: str
    t: int
    k: int
    cached: bool = False

    @property
    def service(self) -> str:
        return service_of(self.uri)


@dataclass(frozen=True)
class Amnesia:
    """``]lo, hi]`` of one entity (``uri``) or of the entities a backup did not know (``None``)."""

    service: str
    uri: str | None
    recovery: str
    lo: int
    hi: int | None
    from_epoch: int
    to_epoch: int
    recovered_from: tuple[str, ...] = ()

    def covers(self, t: int) -> bool:
        return self.lo < t and (self.hi is None or t <= self.hi)

    @property
    def empty(self) -> bool:
        return self.hi is not None and self.hi <= self.lo


@dataclass(frozen=True)
class LocalProblem:
    """A service's own metadata disagrees with its tables (local consistency, Definition 1)."""

    service: str
    uri: str | None
    problem: str


Kind = Literal["missing", "newer", "epoch", "lost"]


@dataclass(frozen=True)
class Violation:
    """A reference that is not valid, with both ends, and the amnesia that explains it if any."""

    kind: Kind
    reference: Reference
    entity: Entity | None
    covered_by: Amnesia | None

    @property
    def detail(self) -> str:
        r, e = self.reference, self.entity
        if e is None:
            return f"{r.uri} does not exist"
        return {
            "newer": f"reference t={r.t} is newer than the entity's t={e.t}",
            "epoch": f"reference epoch {r.k} is ahead of the entity's epoch {e.k}",
            "lost": f"the version t={r.t} was lost in an amnesia interval",
        }.get(self.kind, self.kind)


@dataclass(frozen=True)
class IntegritySnapshot:
    entities: Mapping[str, Entity]
    references: Sequence[Reference]
    amnesia: Sequence[Amnesia] = ()
    local: Sequence[LocalProblem] = ()


@dataclass(frozen=True)
class Repair:
    """Definition 3's output: an amnesia interval and the references that fall in it."""

    amnesia: Amnesia
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class IntegrityReport:
    local: tuple[LocalProblem, ...]
    violations: tuple[Violation, ...]
    repairs: tuple[Repair, ...]

    @property
    def uncovered(self) -> tuple[Violation, ...]:
        return tuple(v for v in self.violations if v.covered_by is None)

    @property
    def globally_consistent(self) -> bool:
        """Definition 1: every service locally consistent and every reference valid."""
        return not self.local and not self.violations

    @property
    def weakly_consistent(self) -> bool:
        """Definition 3: locally consistent, and every invalid reference is in an amnesia interval."""
        return not self.local and not self.uncovered

    def to_json(self) -> dict[str, Any]:
        def ref(r: Reference) -> dict[str, Any]:
            return asdict(r)

        return {
            "globally_consistent": self.globally_consistent,
            "weakly_consistent": self.weakly_consistent,
            "local": [asdict(p) for p in self.local],
            "violations": [
                {
                    "kind": v.kind,
                    "detail": v.detail,
                    "reference": ref(v.reference),
                    "entity": None if v.entity is None else asdict(v.entity),
                    "covered": v.covered_by is not None,
                }
                for v in self.violations
            ],
            "amnesia": [
                {
                    "service": r.amnesia.service,
                    "entity": r.amnesia.uri,
                    "interval": [r.amnesia.lo, r.amnesia.hi],
                    "epochs": [r.amnesia.from_epoch, r.amnesia.to_epoch],
                    "recovery": r.amnesia.recovery,
                    "recovered_from": list(r.amnesia.recovered_from),
                    "references": [ref(x) for x in r.references],
                }
                for r in self.repairs
            ],
        }


def amnesia_for(snapshot: IntegritySnapshot, uri: str) -> list[Amnesia]:
    """The intervals that speak for ``uri``: its own, plus each recovery's interval for unknown
    entities when that recovery did not know ``uri`` (recorded no interval of its own for it)."""
    own = [a for a in snapshot.amnesia if a.uri == uri]
    recoveries_with_own = {a.recovery for a in own}
    service = service_of(uri)
    unknown = [
        a
        for a in snapshot.amnesia
        if a.uri is None and a.service == service and a.recovery not in recoveries_with_own
    ]
    return own + unknown


def check(snapshot: IntegritySnapshot) -> IntegrityReport:
    """Definitions 1 and 3 over one snapshot.

    A reference ``(uri, t, k)`` is valid when the entity exists (a tombstone counts), ``k`` is not
    ahead of the entity's epoch, ``t`` is not ahead of its ``t``, and ``t`` falls in none of its
    amnesia intervals (epochs are comparable through the intervals that separate them: a version
    older than a restore is valid when the restore did not lose it).
    """
    intervals: dict[str, list[Amnesia]] = {}
    violations: list[Violation] = []
    in_amnesia: dict[int, list[Reference]] = defaultdict(list)
    for ref in sorted(snapshot.references, key=lambda r: (r.holder, r.table, r.key, r.column)):
        applicable = intervals.setdefault(ref.uri, amnesia_for(snapshot, ref.uri))
        covering = next((a for a in applicable if a.covers(ref.t)), None)
        entity = snapshot.entities.get(ref.uri)
        kind: Kind | None = None
        if entity is None:
            kind = "missing"
        elif ref.k > entity.k:
            kind = "epoch"
        elif ref.t > entity.t:
            kind = "newer"
        elif covering is not None:
            kind = "lost"
        if kind is not None:
            violations.append(Violation(kind, ref, entity, covering))
            if covering is not None:
                in_amnesia[id(covering)].append(ref)
    repairs = tuple(
        Repair(a, tuple(in_amnesia.get(id(a), ())))
        for a in sorted(snapshot.amnesia, key=lambda a: (a.service, a.uri or "", a.lo))
        if not a.empty
    )
    return IntegrityReport(tuple(snapshot.local), tuple(violations), repairs)


# -- loading a snapshot from the core ----------------------------------------------------------

_ENTITIES = text("SELECT uri, t, k, d, deleted, pending FROM vms.entities")
_AMNESIA = text(
    "SELECT service, uri, recovery_id, lo, hi, from_epoch, to_epoch, recovered_from FROM vms.amnesia"
)
_REFERENCE_COLUMNS = text(
    "SELECT c.holder, c.holder_table, c.column_name, c.target_service, c.key_columns "
    "FROM vms.reference_columns c WHERE to_regclass(quote_ident(c.holder) || '.' || "
    "quote_ident(c.holder_table)) IS NOT NULL ORDER BY 1, 2, 3"
)
_REFERENCEABLES = text(
    "SELECT r.service, r.entity, r.key_columns, to_regclass(quote_ident(r.service) || '.' || "
    "quote_ident(r.entity)) IS NOT NULL AS present FROM vms.referenceables r ORDER BY 1, 2"
)
_RECOVERING = text("SELECT service FROM vms.ref_services WHERE recovering IS NOT NULL")
_COUNTS = text("SELECT uri, holder, count FROM vms.entity_holders")


def stored_references(holder: str, table: str, column: str, keys: Sequence[str], where: str = "") -> str:
    """Every reference kept in ``holder.table.column`` (requests still in flight excluded)."""
    col = quote_ident(column)
    key = "concat_ws('/', " + ", ".join(f"x.{quote_ident(c)}::text" for c in keys) + ")"
    return (
        f"SELECT {key} AS key, x.{col} AS ref FROM {quote_ident(holder)}.{quote_ident(table)} x "
        f"WHERE x.{col} ? 'uri' AND x.{col} ? 't' AND NOT x.{col} ? 'pending' {where}"
    )


def _parse(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


async def references_in(
    conn: AsyncConnection, service: str | None = None, holder: str | None = None
) -> list[tuple[Reference, dict[str, Any]]]:
    """References stored in this core (to ``service``'s entities, held by ``holder``, if given)."""
    found = []
    for h, table, column, target, keys in (await conn.execute(_REFERENCE_COLUMNS)).all():
        if (service is not None and target != service) or (holder is not None and h != holder):
            continue
        where = "" if service is None else f"AND starts_with(x.{quote_ident(column)}->>'uri', :prefix)"
        rows = await conn.execute(
            text(stored_references(h, table, column, keys, where)), {"prefix": f"vms://{service}/"}
        )
        for key, raw in rows.all():
            data = _parse(raw)
            found.append(
                (
                    Reference(
                        h, table, key, column, data["uri"], int(data["t"]), int(data["k"]), "copy" in data
                    ),
                    data,
                )
            )
    # Event-sourced holders keep their references as records of their logs (§3.2).
    for logged in await log_references(conn, service=service, holder=holder):
        data = logged.data
        t, k, cached = int(data["t"]), int(data["k"]), "copy" in data
        reference = Reference(logged.holder, LOG_TABLE, str(logged.seq), "ref", data["uri"], t, k, cached)
        found.append((reference, data))
    return found


async def load_snapshot(conn: AsyncConnection) -> IntegritySnapshot:
    """Everything the checkers need, from this core (run it in one REPEATABLE READ transaction)."""
    entities = {
        uri: Entity(uri, t, k, d, deleted, pending)
        for uri, t, k, d, deleted, pending in (await conn.execute(_ENTITIES)).all()
    }
    intervals = [
        Amnesia(
            r.service,
            r.uri,
            str(r.recovery_id),
            r.lo,
            r.hi,
            r.from_epoch,
            r.to_epoch,
            tuple(r.recovered_from),
        )
        for r in (await conn.execute(_AMNESIA)).all()
    ]
    references = [ref for ref, _ in await references_in(conn)]
    recovering = set((await conn.execute(_RECOVERING)).scalars())
    local = await _local_problems(conn, entities, references, recovering)
    return IntegritySnapshot(entities, references, intervals, local)


async def _local_problems(
    conn: AsyncConnection,
    entities: Mapping[str, Entity],
    references: Sequence[Reference],
    recovering: set[str],
) -> list[LocalProblem]:
    problems: list[LocalProblem] = []
    for service, table, keys, present in (await conn.execute(_REFERENCEABLES)).all():
        if not present:
            problems.append(LocalProblem(service, None, f"table {service}.{table} is missing (crashed?)"))
            continue
        rows = await conn.execute(
            text(
                f"""
                WITH r AS (SELECT {uri_expression(service, table, keys, "x")} AS uri
                             FROM {quote_ident(service)}.{quote_ident(table)} x),
                     e AS (SELECT uri, deleted FROM vms.entities WHERE service = :s AND entity = :t)
                SELECT coalesce(r.uri, e.uri) AS uri, r.uri IS NOT NULL AS has_row, e.deleted
                  FROM r FULL JOIN e ON e.uri = r.uri
                 WHERE e.uri IS NULL OR (r.uri IS NULL AND NOT e.deleted) OR (r.uri IS NOT NULL AND e.deleted)
                """
            ),
            {"s": service, "t": table},
        )
        for uri, has_row, deleted in rows.all():
            problem = (
                "a row with no metadata"
                if deleted is None
                else "a tombstone whose row still exists"
                if has_row
                else "metadata of a row that does not exist"
            )
            problems.append(LocalProblem(service, uri, problem))
    counts: dict[tuple[str, str], int] = {(u, h): c for u, h, c in (await conn.execute(_COUNTS)).all()}
    local_holders = {r.holder for r in references} | {
        h for h, *_ in (await conn.execute(_REFERENCE_COLUMNS)).all()
    }
    actual: dict[tuple[str, str], int] = defaultdict(int)
    for ref in references:
        if ref.uri in entities:
            actual[(ref.uri, ref.holder)] += 1
    problems += count_problems(entities, counts, actual, local_holders, recovering)
    return problems


def count_problems(
    entities: Mapping[str, Entity],
    counts: Mapping[tuple[str, str], int],
    actual: Mapping[tuple[str, str], int],
    local_holders: Iterable[str],
    recovering: Iterable[str],
) -> list[LocalProblem]:
    """``d`` against the per-holder counts, the counts against the references this core holds,
    and tombstones left with nothing referencing them. Skipped for a service still recovering:
    until every holder answered, its counts are known to be stale."""
    problems = []
    waiting, holders = set(recovering), set(local_holders)
    sums: dict[str, int] = defaultdict(int)
    for (uri, _), c in counts.items():
        sums[uri] += c
    for uri, e in sorted(entities.items()):
        if e.service in waiting:
            continue
        if e.d != sums.get(uri, 0):
            problems.append(LocalProblem(e.service, uri, f"d={e.d} but holders count {sums.get(uri, 0)}"))
        if e.deleted and e.d <= 0:
            problems.append(LocalProblem(e.service, uri, "a tombstone nothing references"))
    for key in sorted(set(counts) | set(actual)):
        uri, holder = key
        owner = entities.get(uri)
        held, counted = actual.get(key, 0), counts.get(key, 0)
        if holder in holders and owner is not None and owner.service not in waiting and held != counted:
            problems.append(
                LocalProblem(owner.service, uri, f"{holder} holds {held} reference(s), counted {counted}")
            )
    return problems
