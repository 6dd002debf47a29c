"""Two small services with their own revision histories, for the migration tests.

Revisions live in ``migrations/<service>/`` beside this module (the default location). The
warehouse's history has two revisions (the second adds a private table and a column); the
basket's has one. ``faulty`` (in :mod:`.faulty`) has a second revision that fails.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Service, Transactional, session


class Warehouse(Service, name="warehouse"):
    @Transactional(type="RW")
    async def stock(self, item_id: str, qty: int) -> None:
        session().add(Item(id=item_id, qty=qty, location="A1"))


@Warehouse.export
class Item(Warehouse.Model):
    """Exported: other services may read it, never write it."""

    __tablename__ = "items"
    id: Mapped[str] = mapped_column(primary_key=True)
    qty: Mapped[int]
    location: Mapped[str | None]  # added by the second revision


class Audit(Warehouse.Model):
    """Private to the warehouse; created by the second revision."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str]


class Basket(Service, name="basket"):
    @Transactional(type="RW")
    async def add(self, line_id: str, item_id: str, qty: int) -> None:
        session().add(Line(id=line_id, item_id=item_id, qty=qty))

    @Transactional(type="RO")
    async def items(self) -> list[tuple[str, int]]:
        rows = await session().execute(select(Item.id, Item.qty).order_by(Item.id))
        return [(r.id, r.qty) for r in rows]


class Line(Basket.Model):
    __tablename__ = "lines"
    id: Mapped[str] = mapped_column(primary_key=True)
    item_id: Mapped[str]
    qty: Mapped[int]


app = App([Warehouse, Basket])
services = [Warehouse, Basket]
