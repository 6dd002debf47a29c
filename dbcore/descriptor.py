"""Service descriptors: the one data structure that crosses from the framework into the core.

A descriptor is plain JSON. The framework builds it from annotated classes at start-up; the core
reads it to create the service's schema, role, grants and subscriptions. Nothing in here knows
about Python classes or decorators, so a descriptor could as well be written by hand or come from
another language.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dbcore.catalog import SERVICE_ROLE_PREFIX

__all__ = [
    "ColumnDescriptor",
    "EventTypeDescriptor",
    "ExportedFunctionDescriptor",
    "InboundDescriptor",
    "LeaseDescriptor",
    "LimitsDescriptor",
    "OutboundDescriptor",
    "QueryDescriptor",
    "ReferenceColumnDescriptor",
    "ReferenceableDescriptor",
    "ReplicaDescriptor",
    "ServiceDescriptor",
    "TableDescriptor",
    "TransactionalDescriptor",
    "role_for",
    "service_name_problem",
]

TxType = Literal["RW", "RO"]
Isolation = Literal["serializable", "snapshot", "read_committed"]

_SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_RESERVED = frozenset({"vms", "public", "information_schema", "pg_catalog", "pg_toast"})


def service_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a service (it doubles as a Postgres schema), or ``None``."""
    if not isinstance(name, str) or not _SERVICE_NAME.match(name):
        return (
            f"{name!r} must be a lower-case identifier (letters, digits, '_', at most 40 "
            "characters, starting with a letter): it becomes the service's Postgres schema"
        )
    if name in _RESERVED or name.startswith("pg_"):
        return f"{name!r} is reserved for Postgres or the core (vms, public, pg_*, information_schema)"
    return None


def role_for(service: str) -> str:
    """The Postgres role every transaction of ``service`` runs under."""
    return SERVICE_ROLE_PREFIX + service


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColumnDescriptor(_Frozen):
    name: str
    type: str
    nullable: bool = True
    primary_key: bool = False


class TableDescriptor(_Frozen):
    name: str
    entity: str = Field(description="the model class name other services use in @Query and @Lease")
    columns: tuple[ColumnDescriptor, ...]
    exported: bool = False

    def column(self, name: str) -> ColumnDescriptor | None:
        return next((c for c in self.columns if c.name == name), None)


class ExportedFunctionDescriptor(_Frozen):
    """A named SQL function an owner offers to other services' queries, e.g. ``expired()``."""

    entity: str
    name: str
    returns: str
    body: str


class EventTypeDescriptor(_Frozen):
    name: str
    key: str | None
    json_schema: dict[str, Any]


class InboundDescriptor(_Frozen):
    event: str
    handler: str
    precedence: tuple[str, ...] = ()
    max_attempts: int = 5
    blocking: bool = False


class OutboundDescriptor(_Frozen):
    function: str
    events: tuple[str, ...]


class TransactionalDescriptor(_Frozen):
    function: str
    type: TxType
    isolation: Isolation


class LeaseDescriptor(_Frozen):
    function: str
    text: str
    params: tuple[str, ...]


class QueryDescriptor(_Frozen):
    function: str
    text: str
    params: tuple[str, ...]


class ReplicaDescriptor(_Frozen):
    """A copy, held by this service in ``table``, of another service's exported table."""

    table: str
    entity: str
    source_service: str
    source_table: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    version: str | None = None
    consistency: Literal["strong", "eventual"] = "eventual"


class ReferenceableDescriptor(_Frozen):
    """A table whose rows are entities other services may reference (``vms://svc/table/key``)."""

    table: str
    entity: str
    key: tuple[str, ...] = Field(description="the primary key columns: the URI's key parts, in order")


class ReferenceColumnDescriptor(_Frozen):
    """A column of ``table`` holding references to entities of another service's table."""

    table: str
    column: str
    target_service: str
    target_table: str


class LimitsDescriptor(_Frozen):
    """What one service may use of the shared core (``ServiceLimits``); ``None``: no limit.

    ``concurrency``: its handlers and calls running at once in one App; ``connections``: its
    role's ``CONNECTION LIMIT`` (and its pool's cap); ``statement_timeout_ms``: its role's
    ``statement_timeout``.
    """

    concurrency: int | None = Field(default=None, gt=0)
    connections: int | None = Field(default=None, gt=0)
    statement_timeout_ms: int | None = Field(default=None, gt=0)

    def describe(self) -> str:
        """``concurrency=8 connections=10 statement_timeout=2000ms``, or ``-`` without limits."""
        timeout = self.statement_timeout_ms
        parts = [
            f"concurrency={self.concurrency}" if self.concurrency is not None else "",
            f"connections={self.connections}" if self.connections is not None else "",
            f"statement_timeout={timeout}ms" if timeout is not None else "",
        ]
        return " ".join(p for p in parts if p) or "-"


class ServiceDescriptor(_Frozen):
    """Everything the core needs to know about one virtual microservice."""

    name: str
    tables: tuple[TableDescriptor, ...] = ()
    functions: tuple[ExportedFunctionDescriptor, ...] = ()
    events: tuple[EventTypeDescriptor, ...] = ()
    inbound: tuple[InboundDescriptor, ...] = ()
    outbound: tuple[OutboundDescriptor, ...] = ()
    transactional: tuple[TransactionalDescriptor, ...] = ()
    leases: tuple[LeaseDescriptor, ...] = ()
    queries: tuple[QueryDescriptor, ...] = ()
    replicas: tuple[ReplicaDescriptor, ...] = ()
    referenceable: tuple[ReferenceableDescriptor, ...] = ()
    reference_columns: tuple[ReferenceColumnDescriptor, ...] = ()
    dependencies: tuple[str, ...] = ()
    limits: LimitsDescriptor = LimitsDescriptor()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        problem = service_name_problem(value)
        if problem is not None:
            raise ValueError(f"service name {problem}")
        return value

    @property
    def schema_name(self) -> str:
        return self.name

    @property
    def role(self) -> str:
        return role_for(self.name)

    @property
    def exported_tables(self) -> tuple[TableDescriptor, ...]:
        return tuple(t for t in self.tables if t.exported)

    def table(self, name: str) -> TableDescriptor | None:
        return next((t for t in self.tables if t.name == name), None)

    def entity(self, entity: str) -> TableDescriptor | None:
        return next((t for t in self.tables if t.entity == entity), None)

    @property
    def declares_references(self) -> bool:
        """Whether the service takes part in references (G9): it gives or holds some."""
        return bool(self.referenceable or self.reference_columns)

    @property
    def emitted_events(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for out in self.outbound:
            seen.update(dict.fromkeys(out.events))
        return tuple(seen)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceDescriptor:
        return cls.model_validate(data)

    def fingerprint(self) -> str:
        """A stable hash of the descriptor: a changed fingerprint is a new descriptor version."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
