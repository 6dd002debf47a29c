"""Two small services the observability tests watch: a sender (with a lease) and a receiver
whose handler fails on poisonous parcels. ``app`` is for the command-line tests."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Mapped, mapped_column

from framework import App, Event, Inbound, Lease, LeaseGrant, Outbound, Service, Transactional, send, session


class Parcel(Event, key="box"):
    box: str
    poison: bool = False


class Sender(Service, name="sender"):
    @Outbound(Parcel)
    @Transactional(type="RW")
    async def send_parcel(self, box: str, poison: bool = False) -> None:
        send(Parcel(box=box, poison=poison))

    @Lease("FROM Shelf s WHERE s.id = :shelf FOR UPDATE DECREMENT s.qty BY :qty WITH PERIOD :period")
    async def reserve(self, shelf: str, qty: int, period: timedelta) -> LeaseGrant | None: ...

    @Transactional(type="RW")
    async def fill(self, shelf: str, qty: int) -> None:
        session().add(Shelf(id=shelf, qty=qty))


class Shelf(Sender.Model):
    __tablename__ = "shelves"
    id: Mapped[str] = mapped_column(primary_key=True)
    qty: Mapped[int]


class Receiver(Service, name="receiver"):
    @Inbound(Parcel, max_attempts=2)
    @Transactional(type="RW")
    async def on_parcel(self, parcel: Parcel) -> None:
        if parcel.poison:
            raise ValueError(f"parcel {parcel.box} is poisonous")
        session().add(Received(box=parcel.box))


class Received(Receiver.Model):
    __tablename__ = "received"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    box: Mapped[str]


#: ``vmsdb dashboard tests.integration.observed_services:app`` (the database from VMSDB_DATABASE_URL).
app = App([Sender, Receiver], create_tables=True)
