"""Calling ``@Lease`` functions, and settling the leases they grant.

```python
grant = await self.stock.get_stock_item_info(item_id, qty, timedelta(minutes=15))
if grant is not None:
    ...                                   # later, in the checkout's transaction:
    await consume_lease(grant)            # or release_lease(grant), renew_lease(grant, period)
```

A lease call runs the owner's pushed-down function inside the caller's transaction (or its own
transaction, when called outside one): if the caller rolls back, the lease never existed.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.errors import LeaseConsumed, LeaseError, LeaseExpired, LeaseNotFound, LeaseReleased
from dbcore.isolation import translate_error
from dbcore.leases import grant_function, settle_function
from framework._internal import telemetry
from framework._internal.annotations import FunctionSpec
from framework._internal.context import current
from framework._internal.errors import NoTransactionError

if TYPE_CHECKING:
    from framework._internal.app import App
    from framework._internal.runtime import ServiceRuntime

__all__ = ["LeaseExecutor", "LeaseGrant", "consume_lease", "release_lease", "renew_lease"]


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

    def __init__(self, app: App) -> None:
        self.app = app
        self._statements: dict[int, TextClause] = {}

    def _statement(self, owner: str, spec: FunctionSpec) -> TextClause:
        statement = self._statements.get(id(spec))
        if statement is None:
            statement = text(
                f"SELECT {grant_function(owner, spec.name)}(CAST(:key AS jsonb), :qty, :period, :holder)"
            )
            self._statements[id(spec)] = statement
        return statement

    async def call(
        self, owner: ServiceRuntime, spec: FunctionSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> LeaseGrant | None:
        lease = spec.lease
        assert lease is not None
        bound = spec.signature.bind(owner.instance, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        params = {
            "key": json.dumps({column: arguments[p] for column, p in lease.keys}, default=str),
            "qty": arguments[lease.amount_param],
            "period": _period(arguments[lease.period_param], spec.qualname),
        }
        statement = self._statement(owner.name, spec)
        ctx = current()
        if ctx is not None:
            params["holder"] = ctx.service
            result = await ctx.connection.execute(statement, params)
            raw = result.scalar_one()
        else:
            params["holder"] = None
            raw = await self._own_transaction(owner.name, statement, params)
        granted = raw is not None
        self.app.metrics.inc(
            "lease_grants" if granted else "lease_refusals", service=owner.name, function=spec.name
        )
        if not granted:
            return None
        data = json.loads(raw) if isinstance(raw, str) else raw
        return LeaseGrant(
            id=data["id"],
            service=owner.name,
            function=spec.name,
            entity=lease.entity,
            key=data["key"],
            quantity=data["quantity"],
            expires_at=data["expires_at"],
            values=data["row"],
            available=data["available"],
        )

    async def _own_transaction(self, service: str, statement: TextClause, params: dict[str, Any]) -> Any:
        try:
            async with self.app.core.transaction(service) as conn:
                return (await conn.execute(statement, params)).scalar_one()
        except Exception as err:
            translated = translate_error(err, service=service, table_owners=self.app.core.table_owners)
            if translated is None:
                raise
            raise translated from err

    async def settle(
        self, action: str, lease: LeaseGrant | UUID | str, period: timedelta | None = None
    ) -> dict[str, Any]:
        """``consume``, ``release`` or ``renew`` outside any transaction (as the administrator)."""
        async with self.app.core.admin() as conn:
            try:
                return await telemetry.traced(settle(conn, action, lease, period), f"lease {action}", {})
            except Exception as err:
                translated = translate_error(err, service="(app)", table_owners={})
                if translated is None:
                    raise
                raise translated from err

    async def consume(self, lease: LeaseGrant | UUID | str) -> dict[str, Any]:
        return await self.settle("consume", lease)

    async def release(self, lease: LeaseGrant | UUID | str) -> dict[str, Any]:
        return await self.settle("release", lease)

    async def renew(self, lease: LeaseGrant | UUID | str, period: timedelta) -> dict[str, Any]:
        return await self.settle("renew", lease, period)


_WHICH = text("SELECT service, function FROM vms.leases WHERE id = :id")


async def settle(
    conn: AsyncConnection,
    action: str,
    lease: LeaseGrant | UUID | str,
    period: timedelta | None = None,
) -> dict[str, Any]:
    if isinstance(lease, LeaseGrant):
        lease_id, service, function = lease.id, lease.service, lease.function
    else:
        lease_id = lease if isinstance(lease, UUID) else UUID(str(lease))
        row = (await conn.execute(_WHICH, {"id": lease_id})).first()
        if row is None:
            raise LeaseNotFound(str(lease_id), f"lease {lease_id} does not exist (or was reaped)")
        service, function = row.service, row.function
    statement = text(f"SELECT {settle_function(service, function)}(CAST(:id AS uuid), :action, :period)")
    raw = (await conn.execute(statement, {"id": lease_id, "action": action, "period": period})).scalar_one()
    data: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else raw
    refusal = _REFUSALS.get(data.get("error", ""))
    if refusal is not None:
        raise refusal(str(lease_id), data["message"])
    return data


_REFUSALS: dict[str, type[LeaseError]] = {
    "expired": LeaseExpired,
    "released": LeaseReleased,
    "consumed": LeaseConsumed,
    "not_found": LeaseNotFound,
}


async def _in_transaction(
    action: str, lease: LeaseGrant | UUID | str, period: timedelta | None
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
