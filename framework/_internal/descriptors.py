"""Scan annotated ``Service`` classes into ``ServiceDescriptor``s and call plans, checking them
as a whole.

This is the start-up half of the annotations: everything that can only be checked once all the
services of an App are known (a query naming another service's entity, a lease on a column, a
precedence on an event the service does not handle) is checked here, and a mistake is an
``AnnotationError`` naming the function and the offending token. What a call needs at run time
(its transaction, the events it may send, its compiled query) goes into a :class:`CallPlan` per
function and App; the annotations' specs are read, never written.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import sqlglot
from sqlalchemy import Table, TextClause, text
from sqlalchemy.dialects import postgresql
from sqlglot import exp

from dbcore.descriptor import (
    ColumnDescriptor,
    EventTypeDescriptor,
    ExportedFunctionDescriptor,
    InboundDescriptor,
    LeaseDescriptor,
    OutboundDescriptor,
    QueryDescriptor,
    ReplicaDescriptor,
    ServiceDescriptor,
    TableDescriptor,
    TransactionalDescriptor,
)
from dbcore.errors import LanguageError
from dbcore.lease_language import check_lease
from dbcore.query_language import QuerySpec, compile_query
from framework._internal.annotations import FunctionSpec, TransactionalSpec, spec_of
from framework._internal.coordination import coordination
from framework._internal.errors import AnnotationError
from framework._internal.events import Event
from framework._internal.reference_model import describe_references
from framework._internal.results import row_type
from framework._internal.service import Service, SqlFunction

__all__ = [
    "CallPlan",
    "ServicePlan",
    "build_descriptors",
    "build_plans",
    "dependencies_of",
    "function_specs",
]

log = logging.getLogger("vmsdb.dataflow")

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, eq=False)
class CallPlan:
    """How a call of one annotated function runs in one App, worked out once at start-up.

    A new object per App: two Apps built from the same service class share the class's
    ``FunctionSpec`` (immutable) and nothing else.
    """

    spec: FunctionSpec
    #: The ``@Outbound`` event types, for ``send()``'s check.
    allowed_events: frozenset[type[Event]]
    #: The transaction a call runs in: declared, implied by ``@Inbound``/``@Outbound``, or none.
    tx: TransactionalSpec | None
    #: A ``@Query``: its compiled statement, and the type its rows become (``None``: dicts).
    query: QuerySpec | None = None
    row_type: type | None = None
    #: The ``@Query``'s SQL as a statement, built once: a ``text()`` built in each call would
    #: parse its bind parameters and compute its cache key again every time.
    statement: TextClause | None = None


@dataclass(frozen=True)
class ServicePlan:
    """What start-up learned about one service class: its descriptor and its functions' plans."""

    cls: type[Service]
    descriptor: ServiceDescriptor
    #: By attribute name (inherited functions included).
    calls: Mapping[str, CallPlan]

    @property
    def functions(self) -> dict[str, FunctionSpec]:
        """The annotated functions, by attribute name."""
        return {attr: call.spec for attr, call in self.calls.items()}

    @property
    def queries(self) -> dict[str, QuerySpec]:
        """The compiled ``@Query`` statements, by attribute name."""
        return {attr: call.query for attr, call in self.calls.items() if call.query is not None}


def function_specs(cls: type[Service]) -> dict[str, FunctionSpec]:
    """The annotated functions of a service class (inherited ones included), by name."""
    found: dict[str, FunctionSpec] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, Service)):
            continue
        for attr, value in vars(klass).items():
            spec = spec_of(value)
            if spec is not None:
                found[attr] = spec
    return found


def dependencies_of(cls: type[Service]) -> dict[str, type[Service]]:
    """Class annotations naming another service (``stock: Stock``), by attribute name."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as err:  # a forward reference that does not resolve
        raise AnnotationError(
            f"service {cls.__qualname__}", f"its class annotations do not resolve: {err}"
        ) from err
    return {
        attr: hint
        for attr, hint in hints.items()
        if isinstance(hint, type) and issubclass(hint, Service) and hint is not cls
    }


def _tables(cls: type[Service]) -> tuple[TableDescriptor, ...]:
    name = cls.service_name()
    result = []
    for mapper in sorted(cls.Model.registry.mappers, key=lambda m: m.class_.__name__):
        table = mapper.local_table
        if not isinstance(table, Table):
            continue
        if table.schema != name:
            raise AnnotationError(
                f"model {mapper.class_.__qualname__}",
                f"declares schema {table.schema!r} but belongs to service {name!r}; a service's "
                "tables live in its own schema (drop the schema from __table_args__)",
            )
        columns = tuple(
            ColumnDescriptor(
                name=c.name,
                type=c.type.compile(dialect=_DIALECT),
                nullable=bool(c.nullable),
                primary_key=c.primary_key,
            )
            for c in table.columns
        )
        result.append(
            TableDescriptor(
                name=table.name,
                entity=mapper.class_.__name__,
                columns=columns,
                exported=bool(getattr(mapper.class_, "__vms_exported__", False)),
            )
        )
    return tuple(result)


def _check_function(model: type, fn: SqlFunction) -> None:
    where = f"{model.__qualname__}.{fn.name}"
    try:
        parsed = sqlglot.parse(f"SELECT CAST(({fn.body}) AS {fn.returns})", read="postgres")
    except sqlglot.errors.SqlglotError as err:
        raise AnnotationError(where, f"sql_function body or return type does not parse: {err}") from err
    if len(parsed) != 1 or not isinstance(parsed[0], exp.Select) or parsed[0].args.get("from_"):
        raise AnnotationError(where, f"sql_function body must be one SQL expression, got {fn.body!r}")


def _functions(cls: type[Service]) -> tuple[ExportedFunctionDescriptor, ...]:
    result = []
    for mapper in sorted(cls.Model.registry.mappers, key=lambda m: m.class_.__name__):
        model = mapper.class_
        for value in vars(model).values():
            if isinstance(value, SqlFunction):
                _check_function(model, value)
                result.append(
                    ExportedFunctionDescriptor(
                        entity=model.__name__, name=value.name, returns=value.returns, body=value.body
                    )
                )
    return tuple(result)


def _replicas(cls: type[Service]) -> tuple[ReplicaDescriptor, ...]:
    found = (getattr(model, "__vms_replica__", None) for model in cls.__vms_replicas__)
    return tuple(sorted((r for r in found if r is not None), key=lambda r: r.table))


def _event_descriptor(event: type[Event]) -> EventTypeDescriptor:
    return EventTypeDescriptor(
        name=event.event_type(), key=event.__event_key__, json_schema=event.model_json_schema()
    )


def _describe(cls: type[Service], functions: dict[str, FunctionSpec]) -> ServiceDescriptor:
    events: dict[str, type[Event]] = {}

    def note(event: type[Event], where: str) -> None:
        known = events.setdefault(event.event_type(), event)
        if known is not event:
            raise AnnotationError(
                where,
                f"event type name {event.event_type()!r} is used by two classes "
                f"({known.__module__}.{known.__qualname__} and {event.__module__}.{event.__qualname__}); "
                "give one of them another name with class X(Event, name=...)",
            )

    inbound, outbound, transactional, leases, queries = [], [], [], [], []
    for attr, spec in sorted(functions.items()):
        if spec.inbound is not None:
            ib = spec.inbound
            for ev in (ib.event, *ib.precedence):
                note(ev, spec.qualname)
            inbound.append(
                InboundDescriptor(
                    event=ib.event.event_type(),
                    handler=attr,
                    precedence=tuple(p.event_type() for p in ib.precedence),
                    max_attempts=ib.max_attempts,
                    blocking=ib.blocking,
                )
            )
        if spec.outbound:
            for ev in spec.outbound:
                note(ev, spec.qualname)
            outbound.append(
                OutboundDescriptor(function=attr, events=tuple(e.event_type() for e in spec.outbound))
            )
        tx = spec.effective_transaction()
        if tx is not None:
            transactional.append(TransactionalDescriptor(function=attr, type=tx.type, isolation=tx.isolation))
        if spec.lease is not None:
            leases.append(LeaseDescriptor(function=attr, text=spec.lease.text, params=spec.params))
        if spec.query is not None:
            queries.append(QueryDescriptor(function=attr, text=spec.query, params=spec.params))
    referenceable, reference_columns = describe_references(cls)
    return ServiceDescriptor(
        name=cls.service_name(),
        tables=_tables(cls),
        functions=_functions(cls),
        replicas=_replicas(cls),
        referenceable=referenceable,
        reference_columns=reference_columns,
        events=tuple(_event_descriptor(events[k]) for k in sorted(events)),
        inbound=tuple(inbound),
        outbound=tuple(outbound),
        transactional=tuple(transactional),
        leases=tuple(leases),
        queries=tuple(queries),
        dependencies=tuple(sorted({d.service_name() for d in dependencies_of(cls).values()})),
        limits=cls.__vms_limits__.descriptor(),
    )


def _check_inbound(cls: type[Service], functions: dict[str, FunctionSpec]) -> None:
    handled: dict[type[Event], str] = {}
    for spec in functions.values():
        if spec.inbound is None:
            continue
        other = handled.get(spec.inbound.event)
        if other is not None:
            raise AnnotationError(
                spec.qualname,
                f"{cls.service_name()} already handles {spec.inbound.event.__name__} in {other}; "
                "a service has one handler per event type",
            )
        handled[spec.inbound.event] = spec.qualname
    for spec in functions.values():
        if spec.inbound is None:
            continue
        for before in spec.inbound.precedence:
            if before not in handled:
                raise AnnotationError(
                    spec.qualname,
                    f"precedence={before.__name__}, but service {cls.service_name()!r} has no "
                    f"@Inbound handler for {before.__name__}; precedence orders this service's own "
                    "handlers",
                )


def _check_names(classes: Sequence[type[Service]]) -> None:
    seen: dict[str, type[Service]] = {}
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Service)) or cls is Service:
            raise AnnotationError("App", f"{cls!r} is not a Service subclass")
        name = cls.service_name()
        if name in seen and seen[name] is not cls:
            raise AnnotationError(
                f"service {cls.__qualname__}",
                f"claims the name {name!r}, which {seen[name].__qualname__} already has",
            )
        seen[name] = cls


def build_plans(classes: Iterable[type[Service]]) -> list[ServicePlan]:
    """Build and check every service's descriptor; raise ``AnnotationError`` on any mistake."""
    classes = list(classes)
    _check_names(classes)
    classes = list(dict.fromkeys(classes))
    functions = {cls: function_specs(cls) for cls in classes}
    descriptors: dict[type[Service], ServiceDescriptor] = {}
    for cls in classes:
        _check_inbound(cls, functions[cls])
        descriptors[cls] = _describe(cls, functions[cls])
    known = {cls.service_name() for cls in classes}
    catalog = list(descriptors.values())
    plans = []
    for cls in classes:
        desc = descriptors[cls]
        for replica in desc.replicas:
            source = next((d for d in catalog if d.name == replica.source_service), None)
            table = source.table(replica.source_table) if source is not None else None
            if table is not None and not table.exported:
                raise AnnotationError(
                    f"{cls.__qualname__}.replica({table.entity})",
                    f"{table.entity} is not exported by service {replica.source_service!r}; "
                    "mark it with @<Owner>.export to let other services replicate it",
                )
        for dep in desc.dependencies:
            if dep not in known:
                raise AnnotationError(
                    f"service {cls.__qualname__}",
                    f"depends on service {dep!r}, which is not part of this App",
                )
        calls = {attr: _call_plan(spec, desc, catalog) for attr, spec in functions[cls].items()}
        plans.append(ServicePlan(cls, desc, MappingProxyType(calls)))
    for finding in coordination(catalog):  # warnings, listed by `vmsdb services` too
        log.warning("%s", finding.message)
    return plans


def _call_plan(spec: FunctionSpec, desc: ServiceDescriptor, catalog: Sequence[ServiceDescriptor]) -> CallPlan:
    """Check ``spec``'s @Lease or @Query against the catalog and work out how a call runs."""
    query = None
    try:
        if spec.lease is not None:
            check_lease(spec.lease, tables=desc.tables, params=spec.params)
        if spec.query is not None:
            query = compile_query(spec.query, catalog=catalog, caller=desc.name, params=spec.params)
    except LanguageError as err:
        raise AnnotationError(spec.qualname, str(err)) from err
    return CallPlan(
        spec=spec,
        allowed_events=frozenset(spec.outbound),
        tx=spec.effective_transaction(),
        query=query,
        row_type=row_type(spec) if query is not None else None,
        statement=text(query.sql) if query is not None else None,
    )


def build_descriptors(classes: Iterable[type[Service]]) -> list[ServiceDescriptor]:
    return [plan.descriptor for plan in build_plans(classes)]
