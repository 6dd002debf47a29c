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

from typing import Any, ClassVar, TypeVar

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

from dbcore.descriptor import service_name_problem
from framework.errors import AnnotationError

__all__ = ["Service"]

M = TypeVar("M", bound=type)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Service:
    """Base class of every service. Subclass with ``class Cart(Service, name="cart")``."""

    __service_name__: ClassVar[str]
    Model: ClassVar[type[DeclarativeBase]]

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inherited = cls.__dict__.get("__service_name__")
        service_name = name or inherited or cls.__name__.lower()
        problem = service_name_problem(service_name)
        if problem is not None:
            raise AnnotationError(f"service {cls.__qualname__}", f"name={problem}")
        cls.__service_name__ = service_name
        metadata = MetaData(schema=service_name, naming_convention=NAMING_CONVENTION)
        cls.Model = type(
            f"{cls.__name__}Model",
            (DeclarativeBase,),
            {
                "__abstract__": True,
                "metadata": metadata,
                "__vms_service__": cls,
                "__module__": cls.__module__,
            },
        )

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

    def __repr__(self) -> str:
        return f"<service {self.__service_name__}>"
