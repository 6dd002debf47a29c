"""``Service``: the base class of a virtual microservice.

```python
class Stock(Service, name="stock"):
    ...

@Stock.export                      # other services may read it, never write it
class StockItem(Stock.Model):      # table stock.stock_items, owned by role vms_stock
    __tablename__ = "stock_items"
    id: Mapped[str] = mapped_column(primary_key=True)
```

Each service gets its own SQLAlchemy declarative base, ``<Service>.Model``, whose tables live in
the Postgres schema named after the service. A class annotation naming another service
(``stock: Stock``) declares a dependency: the App sets the attribute to a handle through which
the service may call the other's ``@Lease`` and ``@Query`` functions, and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, TypeVar

from sqlalchemy import Column, MetaData, Table
from sqlalchemy.orm import DeclarativeBase

from dbcore.catalog import NAMING_CONVENTION
from dbcore.descriptor import ReplicaDescriptor, service_name_problem
from framework._internal.errors import AnnotationError
from framework._internal.limits import ServiceLimits

__all__ = ["Service", "SqlFunction", "sql_function"]

M = TypeVar("M", bound=type)

class SqlFunction:
    """An SQL function on a model's row, offered to queries as ``alias.<name>()``.

    ``body`` is an SQL expression over ``self`` (the row), e.g. ``"self.expires_at < now()"``.
    On an exported model, other services' ``@Query`` texts may call it; the core creates it in
    the owner's schema at registration, owned by the owner.
    """

    def __init__(self, body: str, *, returns: str = "boolean") -> None:
        self.body = body
        self.returns = returns
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"sql_function({self.body!r}, returns={self.returns!r})"


def sql_function(body: str, *, returns: str = "boolean") -> Any:
    """Declare an SQL function on a model (see :class:`SqlFunction`)."""
    return SqlFunction(body, returns=returns)


class Service:
    """Base class of every service. Subclass with ``class Cart(Service, name="cart")``."""

    __service_name__: ClassVar[str]
    if TYPE_CHECKING:
        # Each service's Model is a DeclarativeBase subclass made at run time; to a type checker
        # it is DeclarativeBase itself, so ``class Item(Stock.Model)`` type-checks in user code.
        Model: TypeAlias = DeclarativeBase
    else:
        Model: ClassVar[type[DeclarativeBase]]
    __vms_replicas__: ClassVar[list[type]]
    __vms_limits__: ClassVar[ServiceLimits] = ServiceLimits()

    def __init_subclass__(
        cls, *, name: str | None = None, limits: ServiceLimits | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        inherited = cls.__dict__.get("__service_name__")
        service_name = name or inherited or cls.__name__.lower()
        problem = service_name_problem(service_name)
        if problem is not None:
            raise AnnotationError(f"service {cls.__qualname__}", f"name={problem}")
        cls.__service_name__ = service_name
        if limits is not None and not isinstance(limits, ServiceLimits):
            raise AnnotationError(
                f"service {service_name!r}", f"limits= must be a ServiceLimits(...), got {limits!r}"
            )
        if limits is not None:
            problem = limits.problem()
            if problem is not None:
                raise AnnotationError(f"service {service_name!r}", problem)
            cls.__vms_limits__ = limits
        cls.__vms_replicas__ = []
        metadata = MetaData(schema=service_name, naming_convention=NAMING_CONVENTION)
        model_base = type(
            f"{cls.__name__}Model",
            (DeclarativeBase,),
            {
                "__abstract__": True,
                "metadata": metadata,
                "__vms_service__": cls,
                "__module__": cls.__module__,
            },
        )
        setattr(cls, "Model", model_base)  # noqa: B010 - see the TYPE_CHECKING alias above

    @classmethod
    def service_name(cls) -> str:
        return cls.__service_name__

    @classmethod
    def export(cls, model: M) -> M:
        """Let other services read ``model``'s table (read-only)."""
        if not (isinstance(model, type) and issubclass(model, cls.Model)):
            raise AnnotationError(
                f"@{cls.__name__}.export",
                f"{model!r} is not a model of service {cls.__service_name__!r} "
                f"(declare it as class X({cls.__name__}.Model))",
            )
        model.__vms_exported__ = True
        return model

    @classmethod
    def referenceable(cls, model: M) -> M:
        """Let other services hold references to ``model``'s rows (G9): URIs, ``t``, ``k``, ``d``."""
        if not (isinstance(model, type) and issubclass(model, cls.Model)):
            raise AnnotationError(
                f"@{cls.__name__}.referenceable",
                f"{model!r} is not a model of service {cls.__service_name__!r}",
            )
        model.__vms_referenceable__ = True
        return model

    @classmethod
    def replica(
        cls,
        source: type[DeclarativeBase],
        *,
        consistency: Literal["strong", "eventual"] = "eventual",
        version: str | None = None,
        table: str | None = None,
        columns: Sequence[str] | None = None,
    ) -> type[DeclarativeBase]:
        """Keep a copy of another service's exported model in this service's schema.

        Returns the replica's model class (same columns, in table ``replica_<source table>``
        unless ``table`` is given), readable with this service's own session. ``strong``: kept
        equal to the source in the source's transaction; ``eventual``: kept from change events,
        never moving back to an older ``version``.
        """
        where = f"{cls.__name__}.replica({getattr(source, '__name__', source)!r})"
        owner = getattr(source, "__vms_service__", None)
        source_table = getattr(source, "__table__", None)
        if owner is None or not isinstance(source_table, Table) or owner is cls:
            raise AnnotationError(where, "the source must be a model of another service")
        if consistency not in ("strong", "eventual"):
            raise AnnotationError(where, f"consistency must be 'strong' or 'eventual', got {consistency!r}")
        wanted = list(columns) if columns is not None else [c.name for c in source_table.columns]
        keys = [c.name for c in source_table.primary_key.columns]
        unknown = [c for c in (*wanted, *([version] if version else [])) if c not in source_table.columns]
        if unknown:
            raise AnnotationError(where, f"{source.__name__} has no column {unknown[0]!r}")
        wanted += [c for c in (*keys, *([version] if version else [])) if c not in wanted]
        copy = Table(
            table or f"replica_{source_table.name}",
            cls.Model.metadata,
            *(
                Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                for c in source_table.columns
                if c.name in wanted
            ),
        )
        model = type(
            "".join(part.title() for part in copy.name.split("_")),
            (cls.Model,),
            {"__table__": copy, "__module__": cls.__module__},
        )
        model.__vms_replica__ = ReplicaDescriptor(  # type: ignore[attr-defined]
            table=copy.name,
            entity=model.__name__,
            source_service=owner.service_name(),
            source_table=source_table.name,
            columns=tuple(c.name for c in copy.columns),
            key=tuple(keys),
            version=version,
            consistency=consistency,
        )
        # Declarative registries hold classes weakly; the service keeps its replicas alive.
        cls.__dict__.get("__vms_replicas__", []).append(model)
        return model

    def __repr__(self) -> str:
        return f"<service {self.__service_name__}>"
