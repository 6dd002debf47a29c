"""References across services (G9) and disaster recovery (G10), as a service author uses them.

```python
@referenceable                                   # rows become entities vms://crm/customers/<id>
class Customer(Crm.Model):
    __tablename__ = "customers"
    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]

class Order(Shop.Model):
    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(primary_key=True)
    customer: Mapped[Ref | None] = ref_column(Customer)   # JSONB {uri, t, k, copy}

class Shop(Service, name="shop"):
    @Transactional
    async def place(self, order_id: str, customer_id: str) -> None:
        ref = await get_reference(Customer, customer_id, copy=["name"])   # d += 1, same transaction
        session().add(Order(id=order_id, customer=ref))
```

Many references at once (an order's lines, its customer) take one statement, and a gone
entity is an answer, not an error, so the transaction goes on without a savepoint:

```python
taken = await get_references([(Product, (seller_id, product_id)), (Customer, customer_id)], copy=True)
refs = [t.ref for t in taken]                      # None where t.refusal is "not_found"/"deleted"
```

Models stay plain: the core keeps each entity's ``(t, k, d, ⊥)`` with a trigger. ``delete_reference``
gives a reference back (``d -= 1``; a deleted entity stays as a tombstone until then), and
``refresh_reference`` re-reads the entity into a reference's cached copy.

Recovery: :func:`backup` one service, :func:`crash` it (a simulated disaster), :func:`restore` it
into a new epoch; the services of this App that reference it answer with their cached copies
and :func:`check` reports Definitions 1 and 3 (what needs manual repair); :func:`check_logs`
derives them from the event logs of event-sourced services (``framework.event_sourcing``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dbcore import backup as backups
from dbcore import event_logs, integrity, log_integrity, recovery, reference_events, references
from dbcore.backup import BackupInfo
from dbcore.integrity import IntegrityReport
from dbcore.isolation import service_connection
from dbcore.recovery import Mode, RecoveryState
from dbcore.references import (
    EntityDeleted,
    EntityNotFound,
    Ref,
    ReferenceResult,
    ServiceRecovering,
    TruncateRefused,
    uri_for,
)
from framework._internal.context import current
from framework._internal.errors import NoTransactionError
from framework._internal.reference_model import RefType, owner_of, ref_column, referenceable

if TYPE_CHECKING:
    from dbcore.core import Core
    from dbcore.descriptor import ServiceDescriptor
    from framework._internal.config import Settings

__all__ = [
    "EntityDeleted",
    "EntityNotFound",
    "Host",
    "Ref",
    "RefTarget",
    "RefType",
    "ReferenceResult",
    "ServiceRecovering",
    "TruncateRefused",
    "answer",
    "backup",
    "check",
    "check_logs",
    "crash",
    "delete_reference",
    "get_reference",
    "get_references",
    "install",
    "ref_column",
    "referenceable",
    "refresh_reference",
    "release_remote",
    "request_reference",
    "restore",
    "uri_of",
]


class Host(Protocol):
    """What integrity and recovery need of an App: a running ``App`` is one; so is the command
    line's bare connection to the core (an App cannot start while a service's schema is lost)."""

    @property
    def core(self) -> Core: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def descriptors(self) -> list[ServiceDescriptor]: ...


async def install(app: Host) -> None:
    """Install every service's referenceable tables and reference columns, as its descriptor
    declares them (at start, once the tables exist). The catalog itself is the core's
    (``Core.install()``, core revision 0003)."""
    async with app.core.admin() as conn:
        for descriptor in app.descriptors:
            await references.install_service(conn, descriptor)


def uri_of(model: type, *key: object) -> str:
    """The URI of the entity of ``model`` with primary key ``key``."""
    service, table = owner_of(model, f"uri_of({getattr(model, '__name__', model)})")
    return uri_for(service, table, *key)


def _connection(what: str) -> Any:
    ctx = current()
    if ctx is None:
        raise NoTransactionError(
            f"{what}() runs in the caller's transaction: call it inside a @Transactional function"
        )
    return ctx.connection


async def get_reference(target: type | str, *key: object, copy: bool | Sequence[str] = False) -> Ref:
    """Reference an entity (``d += 1``) in the running transaction; ``(uri, t, k[, copy])``.

    ``target``: a ``@referenceable`` model and its key, or a URI. ``copy``: cache the row (or
    these columns of it) in the reference. Raises ``EntityNotFound``, ``EntityDeleted``, or
    ``ServiceRecovering`` while the owner recovers in consistency mode.
    """
    uri = target if isinstance(target, str) else uri_of(target, *key)
    return await references.get_reference(_connection("get_reference"), uri, copy=copy)


#: An entity for :func:`get_references`: its URI, ``(model, key)``, or ``(model, key, copy)`` to
#: copy otherwise than the batch's default. ``key`` is a tuple of the primary key's values, in
#: its columns' order; any other value is the key of a one-column primary key.
RefTarget = str | tuple[type, object] | tuple[type, object, bool | Sequence[str]]


def _target(target: RefTarget, copy: bool | Sequence[str]) -> tuple[str, bool | Sequence[str]]:
    if isinstance(target, str):
        return target, copy
    model, key, *own = target
    uri = uri_of(model, *(key if isinstance(key, tuple) else (key,)))
    return uri, own[0] if own else copy


async def get_references(
    targets: Iterable[RefTarget], *, copy: bool | Sequence[str] = False
) -> list[ReferenceResult]:
    """Reference many entities (``d += 1`` each) in the running transaction, in one statement.

    One ``ReferenceResult`` per target, in the order given: ``taken`` with its ``ref``, or the
    ``refusal`` (``"not_found"``, ``"deleted"``) that counted nothing for it. Nothing is raised
    for a refusal and the transaction stays usable, without a savepoint (``error()`` and
    ``raise_if_refused()`` give the error :func:`get_reference` would have raised). ``copy``:
    what to cache of each entity whose target does not say. The entities are locked in URI
    order, so concurrent batches in any orders do not deadlock. Raises ``ServiceRecovering``,
    for the whole batch, while an owner recovers in consistency mode.
    """
    given = [_target(t, copy) for t in targets]
    return await references.get_references(_connection("get_references"), given, copy=copy)


async def refresh_reference(ref: Ref, *, copy: bool | Sequence[str] | None = None) -> Ref:
    """``ref`` with the entity's current version (and copy: the same columns as before).

    A deleted entity answers with ``deleted=True`` and its last value: the reference stays valid.
    """
    if copy is None:
        copy = list(ref.copy) if ref.copy else False
    return await references.refresh_reference(_connection("refresh_reference"), ref.uri, copy=copy)


async def delete_reference(ref: Ref | str) -> bool:
    """Give a reference back (``d -= 1``) in the running transaction."""
    uri = ref if isinstance(ref, str) else ref.uri
    return await references.delete_reference(_connection("delete_reference"), uri)


async def request_reference(
    holder: type,
    holder_key: Mapping[str, Any],
    column: str,
    target: type | str,
    *key: object,
    copy: bool | Sequence[str] = False,
    refresh: bool = False,
) -> str:
    """Ask another core for a reference, to be stored in ``holder``'s row ``holder_key``.

    For an owner in another core (reached through Kafka): the row's ``column`` reads as ``None``
    until the owner's ``vms.ref.granted`` arrives and fills it in. ``refresh``: re-read the
    entity into the reference the row holds (which stays as it is until the answer). Returns
    the request id.
    """
    ctx = current()
    if ctx is None:
        raise NoTransactionError("request_reference() runs in the caller's transaction")
    if ctx.has_session:
        await ctx.session.flush()  # the row must exist before the request marks it
    service, table = owner_of(holder, f"request_reference({getattr(holder, '__name__', holder)})")
    uri = target if isinstance(target, str) else uri_of(target, *key)
    return await reference_events.request_reference(
        ctx.connection,
        holder=service,
        table=table,
        key=holder_key,
        column=column,
        uri=uri,
        copy=copy,
        refresh=refresh,
    )


async def release_remote(ref: Ref | str) -> None:
    """Give back a reference to an entity of another core (sent as ``vms.ref.release``)."""
    ctx = current()
    if ctx is None:
        raise NoTransactionError("release_remote() runs in the caller's transaction")
    uri = ref if isinstance(ref, str) else ref.uri
    await reference_events.release_remote(ctx.connection, ctx.service, uri)


# -- integrity and recovery ----------------------------------------------------------------------


async def check(app: Host) -> IntegrityReport:
    """Definitions 1 and 3 over one snapshot of the core."""
    async with service_connection(app.core.engine, None, isolation="snapshot", read_only=True) as conn:
        return integrity.check(await integrity.load_snapshot(conn))


async def check_logs(app: Host) -> IntegrityReport | None:
    """Definitions 1 and 3 for references to event-sourced entities, derived from the services'
    event logs alone (``None`` when no service keeps one)."""
    async with service_connection(app.core.engine, None, isolation="snapshot", read_only=True) as conn:
        if not await event_logs.services_with_logs(conn):
            return None
        return await log_integrity.check_logs(conn)


def _backup_dir(app: Host, directory: Path | None) -> Path:
    return directory if directory is not None else Path(app.settings.data_dir) / "backups"


async def backup(app: Host, service: str, directory: Path | None = None) -> BackupInfo:
    """Back up one service (schema and metadata) into ``directory`` (default ``<data_dir>/backups``)."""
    return await backups.backup(app.core.engine, service, _backup_dir(app, directory))


async def crash(app: Host, service: str) -> None:
    """Simulate a disaster: ``service``'s schema, metadata and inbox are gone."""
    await backups.crash(app.core.engine, service)


async def answer(app: Host, recovery_id: str, holder: str) -> list[str]:
    """``holder`` (a service of this core) answers a recovery's amnesia; return merged URIs."""
    async with app.core.admin() as conn:
        st = await recovery.state(conn, recovery_id)
        return await recovery.merge(conn, await recovery.answer(conn, recovery_id, st.service, holder))


async def restore(
    app: Host,
    service: str,
    *,
    backup_id: str | None = None,
    mode: Mode = "availability",
    timeout: float = 10.0,
    answers: bool = True,
    replace: bool = False,
) -> RecoveryState:
    """Restore ``service`` from a backup and run the recovery protocol.

    ``availability``: the service serves as soon as it is restored; this core's referencing
    services answer one by one (``answers``), others whenever their answers arrive.
    ``consistency``: the service refuses writes and new references until every expected holder
    answered; after ``timeout`` seconds the recovery ends anyway (``status='timed_out'``).
    """
    state = await backups.restore(app.core.engine, service, backup_id=backup_id, mode=mode, replace=replace)
    # The restored schema is the backup's: re-grant exports, re-create exported functions.
    await app.core.sync_grants(app.descriptors)
    if answers:
        for holder in state.waiting_for:
            if holder in {d.name for d in app.descriptors}:
                await answer(app, state.id, holder)
    deadline = time.monotonic() + timeout
    async with app.core.admin() as conn:
        state = await recovery.state(conn, state.id)
    while mode == "consistency" and state.status == "recovering":
        if time.monotonic() > deadline:
            async with app.core.admin() as conn:
                await recovery.complete(conn, state.id, timed_out=True)
        else:
            await asyncio.sleep(0.05)
        async with app.core.admin() as conn:
            state = await recovery.state(conn, state.id)
    return state
