"""Calling ``@Lease`` functions, and settling the leases they grant.

```python
grant = await self.stock.get_stock_item_info(item_id, qty, timedelta(minutes=15))
if grant is not None:
    ...                                   # later, in the checkout's transaction:
    await consume_lease(grant)            # or release_lease(grant), renew_lease(grant, period)
```

Many leases at once: ``consume_leases``, ``release_leases`` and ``renew_leases`` settle them in
one statement and report each one's outcome instead of raising (no savepoint needed)::

    settled = await consume_leases(lease_ids, granted_by=self.stock.get_stock_item_info)
    refused = [s.id for s in settled if not s.settled]

A lease call runs the owner's pushed-down function inside the caller's transaction (or its own
transaction, when called outside one): if the caller rolls back, the lease never existed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore import leases
from dbcore.leases import Grant, LeaseSettlement, SettleAction
from dbcore.translate import translated
from framework._internal import telemetry
from framework._internal.annotations import spec_of
from framework._internal.context import current
from framework._internal.errors import NoTransactionError
from framework._internal.limits import Slots

if TYPE_CHECKING:
    from framework._internal.descriptors import CallPlan
    from framework._internal.host import Host
    from framework._internal.service import Service

__all__ = [
    "LeaseExecutor",
    "LeaseGrant",
    "LeaseSettlement",
    "consume_lease",
    "consume_leases",
    "release_lease",
    "release_leases",
    "renew_lease",
    "renew_leases",
]


class LeaseGrant(BaseModel):
    """A granted lease: ``quantity`` of ``entity``'s row ``key`` is held until ``expires_at``.

    ``values`` are the row's values when the lease was granted (a price, say); ``available`` is
    what was left for others right after this grant.
    """

    model_config = ConfigDict(frozen=True)

    id: UUID
    service: str
    function: str
    entity: str
    key: dict[str, Any]
    quantity: int | float
    expires_at: datetime
    values: dict[str, Any]
    available: int | float


def _period(value: Any, function: str) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    raise TypeError(f"{function}: the lease period must be a timedelta or seconds, got {value!r}")


class LeaseExecutor:
    """Runs lease functions for an App; one per App."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def call(
        self,
        owner: str,
        instance: Service,
        call: CallPlan,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        slots: Slots | None = None,
    ) -> LeaseGrant | None:
        """Grant a lease of ``owner``'s ``@Lease`` function for this call (``instance`` is the
        owner's running service, bound as ``self``), in the caller's transaction if there is one.
        ``slots``: the owner's concurrency limit, held for a transaction of its own."""
        spec = call.spec
        lease = spec.lease
        assert lease is not None
        bound = spec.signature.bind(instance, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        key = {column: arguments[p] for column, p in lease.keys}
        quantity = arguments[lease.amount_param]
        period = _period(arguments[lease.period_param], spec.qualname)
        ctx = current()
        if ctx is not None:  # in the caller's transaction: its errors surface where it ends
            granted = await leases.grant(ctx.connection, owner, spec.name, key, quantity, period, ctx.service)
        else:
            async with slots.held() if slots is not None else contextlib.nullcontext():
                with translated(owner, self.host.core.table_owners, self.host.core.limits):
                    async with self.host.core.transaction(owner) as conn:
                        granted = await leases.grant(conn, owner, spec.name, key, quantity, period, None)
        self.host.metrics.inc(
            "lease_grants" if granted else "lease_refusals", service=owner, function=spec.name
        )
        return None if granted is None else _lease_grant(granted, owner, spec.name, lease.entity)

    async def settle(
        self, action: SettleAction, lease: LeaseGrant | UUID | str, period: timedelta | None = None
    ) -> dict[str, Any]:
        """``consume``, ``release`` or ``renew`` outside any transaction (as the administrator)."""
        with translated("(app)"):
            async with self.host.core.admin() as conn:
                return await telemetry.traced(settle(conn, action, lease, period), f"lease {action}", {})

    async def consume(self, lease: LeaseGrant | UUID | str) -> dict[str, Any]:
        return await self.settle("consume", lease)

    async def release(self, lease: LeaseGrant | UUID | str) -> dict[str, Any]:
        return await self.settle("release", lease)

    async def renew(self, lease: LeaseGrant | UUID | str, period: timedelta) -> dict[str, Any]:
        return await self.settle("renew", lease, period)


def _lease_grant(granted: Grant, service: str, function: str, entity: str) -> LeaseGrant:
    return LeaseGrant(
        id=granted.id,
        service=service,
        function=function,
        entity=entity,
        key=granted.key,
        quantity=granted.quantity,
        expires_at=granted.expires_at,
        values=granted.row,
        available=granted.available,
    )


async def settle(
    conn: AsyncConnection,
    action: SettleAction,
    lease: LeaseGrant | UUID | str,
    period: timedelta | None = None,
) -> dict[str, Any]:
    """Settle ``lease`` in ``conn``'s transaction (see ``dbcore.leases.settle``)."""
    if isinstance(lease, LeaseGrant):
        return await leases.settle(
            conn, action, lease.id, period, service=lease.service, function=lease.function
        )
    return await leases.settle(conn, action, lease if isinstance(lease, UUID) else UUID(str(lease)), period)


async def _in_transaction(
    action: SettleAction, lease: LeaseGrant | UUID | str, period: timedelta | None
) -> dict[str, Any]:
    ctx = current()
    if ctx is None:
        raise NoTransactionError(
            f"{action}_lease() runs in the caller's transaction: call it inside a @Transactional "
            f"function, or use app.leases.{action}(...) outside one"
        )
    return await telemetry.traced(settle(ctx.connection, action, lease, period), f"lease {action}", {})


async def consume_lease(lease: LeaseGrant | UUID | str) -> dict[str, Any]:
    """Turn the hold into a permanent decrement, atomically with the caller's transaction.

    Idempotent; raises ``LeaseExpired`` or ``LeaseReleased`` (and changes nothing) when the lease
    is no longer active.
    """
    return await _in_transaction("consume", lease, None)


async def release_lease(lease: LeaseGrant | UUID | str) -> dict[str, Any]:
    """Give the held quantity back. Idempotent; releasing an expired lease is a no-op."""
    return await _in_transaction("release", lease, None)


async def renew_lease(lease: LeaseGrant | UUID | str, period: timedelta) -> dict[str, Any]:
    """Extend an active lease to ``period`` from now; ``LeaseExpired`` if it already ran out."""
    return await _in_transaction("renew", lease, period)


# -- many leases in one statement ----------------------------------------------------------


def _lease_function(granted_by: Callable[..., Any]) -> tuple[str, str]:
    """``(service, function)`` of a ``@Lease`` function named as ``Stock.hold``, ``self.hold``
    or ``self.stock.hold`` (a handle's)."""
    spec = spec_of(granted_by)
    owner = getattr(granted_by, "_self_instance", None) or getattr(granted_by, "_self_owner", None)
    owner_class = owner if isinstance(owner, type) else type(owner)
    service_name = getattr(owner_class, "service_name", None)
    if spec is None or spec.lease is None or not callable(service_name):
        raise TypeError(
            f"granted_by= takes the @Lease function that granted the leases (Stock.hold, "
            f"self.stock.hold), got {granted_by!r}"
        )
    return str(service_name()), spec.name


async def settle_many(
    conn: AsyncConnection,
    action: SettleAction,
    many: Iterable[LeaseGrant | UUID | str],
    period: timedelta | None = None,
    granted_by: Callable[..., Any] | None = None,
) -> list[LeaseSettlement]:
    """Settle ``many`` in ``conn``'s transaction (see ``dbcore.leases.settle_many``): one
    statement for the leases of each lease function, named by ``granted_by`` or by the
    ``LeaseGrant`` objects; bare ids of unnamed functions cost one lookup for all."""
    given = list(many)
    ids = [lease.id if isinstance(lease, LeaseGrant) else _uuid(lease) for lease in given]
    named: dict[tuple[str, str] | None, list[UUID]] = {}
    default = None if granted_by is None else _lease_function(granted_by)
    for lease, lease_id in zip(given, ids, strict=True):
        function = (lease.service, lease.function) if isinstance(lease, LeaseGrant) else default
        named.setdefault(function, []).append(lease_id)
    answers: dict[UUID, LeaseSettlement] = {}
    for function, group in named.items():
        service, name = function or (None, None)
        settled = await leases.settle_many(conn, action, group, period, service=service, function=name)
        answers.update((s.id, s) for s in settled)
    return [answers[i] for i in ids]


def _uuid(lease: UUID | str) -> UUID:
    return lease if isinstance(lease, UUID) else UUID(str(lease))


async def _many_in_transaction(
    action: SettleAction,
    many: Iterable[LeaseGrant | UUID | str],
    period: timedelta | None,
    granted_by: Callable[..., Any] | None,
) -> list[LeaseSettlement]:
    ctx = current()
    if ctx is None:
        raise NoTransactionError(
            f"{action}_leases() runs in the caller's transaction: call it inside a @Transactional "
            "function"
        )
    given = list(many)
    # The span of one lease's settle, with how many leases this one settled.
    return await telemetry.traced(
        settle_many(ctx.connection, action, given, period, granted_by),
        f"lease {action}",
        {"vmsdb.leases": len(given)},
    )


async def consume_leases(
    many: Iterable[LeaseGrant | UUID | str], *, granted_by: Callable[..., Any] | None = None
) -> list[LeaseSettlement]:
    """Consume many leases atomically with the caller's transaction, in one statement.

    One ``LeaseSettlement`` per lease, in order: ``settled``, or the ``refusal`` (expired,
    released, not found) that left that lease unchanged. Nothing is raised for a refusal and
    the transaction stays usable. ``granted_by``: the ``@Lease`` function that granted bare ids
    (``self.stock.hold``), which saves looking each one up. Idempotent.
    """
    return await _many_in_transaction("consume", many, None, granted_by)


async def release_leases(
    many: Iterable[LeaseGrant | UUID | str], *, granted_by: Callable[..., Any] | None = None
) -> list[LeaseSettlement]:
    """Give many leases back in one statement; reports refusals as :func:`consume_leases` does
    (releasing an expired lease is settled, a no-op)."""
    return await _many_in_transaction("release", many, None, granted_by)


async def renew_leases(
    many: Iterable[LeaseGrant | UUID | str],
    period: timedelta,
    *,
    granted_by: Callable[..., Any] | None = None,
) -> list[LeaseSettlement]:
    """Extend many active leases to ``period`` from now in one statement; an expired one is
    refused (``"expired"``)."""
    return await _many_in_transaction("renew", many, period, granted_by)
