"""How a service's models declare references (G9): the marker, the column type, and their scan.

``@referenceable`` marks a model whose rows other services may reference; ``ref_column(Target)``
declares a column holding references to ``Target``'s rows. :func:`describe_references` reads
both into descriptor parts at start-up, so the core learns of them from the service descriptor.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import mapped_column
from sqlalchemy.types import TypeDecorator

from dbcore.descriptor import ReferenceableDescriptor, ReferenceColumnDescriptor
from dbcore.references import Ref
from framework._internal.errors import AnnotationError
from framework._internal.service import Service

__all__ = ["RefType", "describe_references", "owner_of", "ref_column", "referenceable"]

M = TypeVar("M", bound=type)


def owner_of(model: type, where: str) -> tuple[str, str]:
    """``(service, table)`` of a model class of some service; ``AnnotationError`` otherwise."""
    owner = getattr(model, "__vms_service__", None)
    table = getattr(model, "__table__", None)
    if owner is None or not isinstance(table, Table):
        raise AnnotationError(where, f"{model!r} is not a model of a service (class X(<Service>.Model))")
    return owner.service_name(), table.name


def referenceable(model: M) -> M:
    """Make ``model``'s rows entities other services can reference (``vms://svc/table/key``)."""
    owner_of(model, f"@referenceable {getattr(model, '__name__', model)!r}")
    model.__vms_referenceable__ = True  # type: ignore[attr-defined]
    return model


class RefType(TypeDecorator[Ref]):
    """A reference stored as JSONB ``{uri, t, k[, copy]}``.

    A reference requested from another core reads as ``None`` until the owner granted it.
    """

    impl = JSONB
    cache_ok = True

    def __init__(self, target: type | None = None) -> None:
        super().__init__()
        self.target = target

    def process_bind_param(self, value: Ref | None, dialect: Dialect) -> Any:
        return None if value is None else value.to_json()

    def process_result_value(self, value: Any, dialect: Dialect) -> Ref | None:
        if not isinstance(value, dict) or "t" not in value or "pending" in value:
            return None
        return Ref.from_json(value)


def ref_column(target: type, *, nullable: bool = True, **kwargs: Any) -> Any:
    """A column holding a reference to an entity of ``target`` (a ``@referenceable`` model)."""
    return mapped_column(RefType(target), nullable=nullable, **kwargs)


def describe_references(
    cls: type[Service],
) -> tuple[tuple[ReferenceableDescriptor, ...], tuple[ReferenceColumnDescriptor, ...]]:
    """``cls``'s referenceable tables and reference columns.

    Raises ``AnnotationError`` for a reference column whose target is not ``@referenceable`` (or
    not a model of a service).
    """
    tables, columns = [], []
    for mapper in sorted(cls.Model.registry.mappers, key=lambda m: m.class_.__name__):
        table = mapper.local_table
        if not isinstance(table, Table):
            continue
        if getattr(mapper.class_, "__vms_referenceable__", False):
            key = tuple(c.name for c in table.primary_key.columns)
            tables.append(ReferenceableDescriptor(table=table.name, entity=mapper.class_.__name__, key=key))
        for column in table.columns:
            if isinstance(column.type, RefType) and column.type.target is not None:
                where = f"{mapper.class_.__qualname__}.{column.name}"
                service, target = owner_of(column.type.target, where)
                if not getattr(column.type.target, "__vms_referenceable__", False):
                    raise AnnotationError(where, f"{column.type.target.__name__} is not @referenceable")
                columns.append(
                    ReferenceColumnDescriptor(
                        table=table.name, column=column.name, target_service=service, target_table=target
                    )
                )
    return tuple(tables), tuple(columns)
