"""A service whose second revision fails halfway (after creating a table and adding a column)."""

from __future__ import annotations

from sqlalchemy.orm import Mapped, mapped_column

from framework import Service


class Faulty(Service, name="faulty"):
    pass


class Thing(Faulty.Model):
    __tablename__ = "things"
    id: Mapped[str] = mapped_column(primary_key=True)


services = [Faulty]
