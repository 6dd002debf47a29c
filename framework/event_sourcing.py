"""Event-sourced entities (recovery paper §3.2, "Case of event sourcing data storage pattern").

```python
class Deposited(EntityEvent):
    amount: int

class Wallet(EventSourced, service=Bank, table="wallets"):   # state = fold of its events
    balance: int = 0

    def apply(self, event: EntityEvent) -> None:
        if isinstance(event, Deposited):
            self.balance += event.amount

class Bank(Service, name="bank"):
    @Transactional
    async def deposit(self, wallet_id: str, amount: int) -> int:
        return (await append(Wallet, wallet_id, Deposited(amount=amount))).balance
```

A service that declares one gets an append-only log, table ``<service>.es_log``, holding:

- its entities' events, each stamped with the version ``(t, k)`` it made (the owner's clock and
  epoch, as for any referenceable row: ``vms://<service>/<table>/<key>``);
- ``vms.deleted`` (the paper's ⊥): :func:`delete` appends it with the entity's last state; the
  log never loses a record;
- ``vms.ref`` / ``vms.unref``: the references one of its entities takes (:func:`take_reference`,
  a creation event carrying ``(URI^e, t_j, k_j)`` and, optionally, a cached copy) and gives back;
- ``vms.amnesia`` (written by a restore: the interval of versions it lost) and
  ``vms.recovered`` (a lost version brought back from a holder's copy by the recovery merge).

The entity's current state is also kept, as a snapshot, in table ``<service>.<table>`` (``key``,
``state``), so that a read need not replay the log and other services can reference and copy it
like any referenceable row. :func:`replay` folds the log from the start, to check the snapshot.
Backups, restores, amnesia intervals and merges work as for any service;
``dbcore.event_logs.check_logs`` derives Definitions 1 and 3 from the logs alone.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel
from sqlalchemy import BigInteger, Integer, String, Text, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbcore.event_logs import DELETED, LOG_TABLE, REF, UNREF
from dbcore.references import Ref, delete_reference, get_reference, refresh_reference, uri_for
from framework._internal.context import current
from framework._internal.errors import AnnotationError, NoTransactionError
from framework._internal.reference_model import owner_of, referenceable
from framework._internal.service import Service

__all__ = [
    "EntityEvent",
    "EventSourced",
    "append",
    "delete",
    "load",
    "log_of",
    "release_reference",
    "replay",
    "take_reference",
]


class EntityEvent(BaseModel):
    """One change of an event-sourced entity; its type name is the class name."""


class EventSourced(BaseModel):
    """The state of an event-sourced entity: a pydantic model folded from its events.

    Subclass with ``service=<Service>`` and ``table=<name>``; override :meth:`apply`. Fields
    need defaults: the fold starts from ``cls()``.
    """

    __vms_service__: ClassVar[type[Service]]
    __vms_state_model__: ClassVar[type[DeclarativeBase]]
    __vms_referenceable__: ClassVar[bool]
    __table__: ClassVar[Any]
    __events__: ClassVar[dict[str, type[EntityEvent]]]

    def __init_subclass__(
        cls, *, service: type[Service] | None = None, table: str | None = None, **kw: Any
    ) -> None:
        super().__init_subclass__(**kw)
        if service is None or table is None:
            raise AnnotationError(
                f"event-sourced entity {cls.__qualname__}",
                "declare it as class X(EventSourced, service=<Service>, table='<table>')",
            )
        state = type(
            f"{cls.__name__}State",
            (service.Model,),
            {
                "__tablename__": table,
                "__annotations__": {"key": Mapped[str], "state": Mapped[dict[str, Any]]},
                "key": mapped_column(Text, primary_key=True),
                "state": mapped_column(JSONB, nullable=False),
            },
        )
        referenceable(state)
        log_of(service)
        cls.__vms_service__ = service
        cls.__vms_state_model__ = state
        cls.__vms_referenceable__ = True  # other services may ref_column() / get_reference() it
        cls.__table__ = state.__table__  # type: ignore[attr-defined]
        cls.__events__ = {}

    def apply(self, event: EntityEvent) -> None:
        """Fold one event into this state (in place). Override it."""
        raise NotImplementedError(f"{type(self).__name__}.apply() must fold {type(event).__name__}")

    @classmethod
    def uri(cls, key: str) -> str:
        service, table = owner_of(cls, cls.__qualname__)
        return uri_for(service, table, key)


_LOGS: dict[type[Service], type[DeclarativeBase]] = {}


def log_of(service: type[Service]) -> type[DeclarativeBase]:
    """The model of ``service``'s event log (``<service>.es_log``), made once per service."""
    log = _LOGS.get(service)
    if log is None:
        log = type(
            f"{service.__name__}EventLog",
            (service.Model,),
            {
                "__tablename__": LOG_TABLE,
                "__annotations__": {
                    "seq": Mapped[int],
                    "t": Mapped[int],
                    "k": Mapped[int],
                    "entity": Mapped[str],
                    "key": Mapped[str],
                    "uri": Mapped[str],
                    "type": Mapped[str],
                    "payload": Mapped[dict[str, Any]],
                },
                "seq": mapped_column(BigInteger, primary_key=True, autoincrement=True),
                "t": mapped_column(BigInteger, nullable=False),
                "k": mapped_column(Integer, nullable=False),
                "entity": mapped_column(String(63), nullable=False),
                "key": mapped_column(Text, nullable=False),
                "uri": mapped_column(Text, nullable=False, index=True),
                "type": mapped_column(String(200), nullable=False),
                "payload": mapped_column(JSONB, nullable=False),
            },
        )
        _LOGS[service] = log
    return log


def _ctx(what: str) -> Any:
    ctx = current()
    if ctx is None:
        raise NoTransactionError(
            f"{what}() runs in the caller's transaction: call it in a @Transactional function"
        )
    return ctx


def _owned(entity: type[EventSourced], ctx: Any, what: str) -> None:
    if entity.__vms_service__.service_name() != ctx.service:
        raise AnnotationError(
            f"{what}({entity.__qualname__})",
            f"service {ctx.service!r} cannot change an entity of service "
            f"{entity.__vms_service__.service_name()!r}: send it an event instead",
        )


async def load(entity: type[EventSourced], key: str) -> EventSourced | None:
    """The entity's current state (from its snapshot), or ``None`` if it does not exist."""
    row = await _ctx("load").session.get(entity.__vms_state_model__, key)
    return None if row is None else entity.model_validate(row.state)


async def append(entity: type[EventSourced], key: str, *events: EntityEvent) -> Any:
    """Fold ``events`` into the entity (created from ``entity()`` if new) and record them in the
    log, stamped with the version they make; returns the new state."""
    ctx = _ctx("append")
    _owned(entity, ctx, "append")
    session = ctx.session
    row = await session.get(entity.__vms_state_model__, key)
    state = entity() if row is None else entity.model_validate(row.state)
    for event in events:
        entity.__events__.setdefault(type(event).__name__, type(event))
        state.apply(event)
    if row is None:
        session.add(entity.__vms_state_model__(key=key, state=state.model_dump(mode="json")))
    else:
        row.state = state.model_dump(mode="json")
    await session.flush()  # the snapshot's trigger stamps the new version (t, k)
    uri = entity.uri(key)
    version = await refresh_reference(ctx.connection, uri, copy=False)
    log = log_of(entity.__vms_service__)
    table = entity.__table__.name
    for event in events:
        session.add(
            log(
                t=version.t,
                k=version.k,
                entity=table,
                key=key,
                uri=uri,
                type=type(event).__name__,
                payload=event.model_dump(mode="json"),
            )
        )
    await session.flush()
    return state


async def delete(entity: type[EventSourced], key: str) -> bool:
    """Append ⊥ (``vms.deleted``, with the last state) and drop the snapshot row; the log keeps
    every record. Returns ``False`` if the entity does not exist."""
    ctx = _ctx("delete")
    _owned(entity, ctx, "delete")
    session = ctx.session
    row = await session.get(entity.__vms_state_model__, key)
    if row is None:
        return False
    uri = entity.uri(key)
    version = await refresh_reference(ctx.connection, uri, copy=False)
    log = log_of(entity.__vms_service__)
    session.add(
        log(
            t=version.t,
            k=version.k,
            entity=entity.__table__.name,
            key=key,
            uri=uri,
            type=DELETED,
            payload=dict(row.state),
        )
    )
    await session.delete(row)
    await session.flush()
    return True


async def replay(entity: type[EventSourced], key: str) -> Self | None:  # type: ignore[misc]
    """Fold the entity's events from its log, from the start (or the last recovered copy)."""
    ctx = _ctx("replay")
    log = log_of(entity.__vms_service__)
    rows = await ctx.session.execute(
        select(log.type, log.payload).where(log.uri == entity.uri(key)).order_by(log.seq)  # type: ignore[attr-defined]
    )
    state: EventSourced | None = None
    for type_, payload in rows.all():
        if type_ == DELETED:
            state = None
        elif type_ == "vms.recovered":
            state = entity.model_validate(payload.get("state", {}))
        elif type_ in entity.__events__:
            state = state if state is not None else entity()
            state.apply(entity.__events__[type_].model_validate(payload))
    return state


async def take_reference(
    holder: type[EventSourced], key: str, target: type, *target_key: object, copy: bool = True
) -> tuple[int, Ref]:
    """Reference ``target``'s entity from the holder entity ``key``: ``d += 1`` at the owner, and
    a ``vms.ref`` record ``(URI^e, t_j, k_j[, copy])`` in the holder's log. Returns the record's
    ``seq`` (to release it) and the reference."""
    ctx = _ctx("take_reference")
    _owned(holder, ctx, "take_reference")
    service, table = owner_of(target, f"take_reference({getattr(target, '__name__', target)})")
    ref = await get_reference(ctx.connection, uri_for(service, table, *target_key), copy=copy)
    seq = await _record(ctx, holder, key, REF, {"ref": ref.to_json()})
    return seq, ref


async def release_reference(holder: type[EventSourced], key: str, seq: int) -> bool:
    """Give back the reference recorded at ``seq``: ``d -= 1`` and a ``vms.unref`` record."""
    ctx = _ctx("release_reference")
    _owned(holder, ctx, "release_reference")
    log = log_of(holder.__vms_service__)
    record = await ctx.session.get(log, seq)
    if record is None or record.type != REF:
        return False
    given_back = select(log.seq).where(log.type == UNREF, log.payload["of"].as_integer() == seq)  # type: ignore[attr-defined]
    if (await ctx.session.execute(given_back)).first() is not None:
        return False
    if not await delete_reference(ctx.connection, record.payload["ref"]["uri"]):
        return False
    await _record(ctx, holder, key, UNREF, {"of": seq})
    return True


async def _record(ctx: Any, holder: type[EventSourced], key: str, type_: str, payload: dict[str, Any]) -> int:
    """A reference record of the holder entity, at the holder's current version."""
    uri = holder.uri(key)
    version = await refresh_reference(ctx.connection, uri, copy=False)
    log = log_of(holder.__vms_service__)
    row = log(
        t=version.t, k=version.k, entity=holder.__table__.name, key=key, uri=uri, type=type_, payload=payload
    )
    ctx.session.add(row)
    await ctx.session.flush()
    return int(row.seq)  # type: ignore[attr-defined]
