"""Helpers every eShop service uses inside its transactions."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import DateTime, Executable, Numeric, delete, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, mapped_column
from sqlalchemy.orm.properties import MappedColumn

from framework import session

__all__ = [
    "CENT",
    "OWN_KEY_GROUP",
    "as_row",
    "clear",
    "money",
    "money_column",
    "now",
    "rows",
    "settle_quietly",
    "timestamp_column",
    "upsert",
]

CENT = Decimal("0.01")

#: ``@Inbound(group_commit=)`` of the handlers that write only rows of their event's own key
#: (a customer's counters, an order's status): under load, a worker runs up to this many queued
#: deliveries of one of them in one transaction. The handlers that lock rows shared across
#: keys (the stock, a seller's totals, the cart's replica) keep one per transaction: two groups
#: locking shared rows in different orders would deadlock.
OWN_KEY_GROUP = 8


def money(value: Decimal | int | float | str) -> Decimal:
    """Round to cents, half up, as invoices do."""
    return Decimal(value).quantize(CENT, rounding=ROUND_HALF_UP)


def money_column(default: int = 0) -> MappedColumn[Any]:
    return mapped_column(Numeric(14, 2), default=Decimal(default))


def timestamp_column(*, nullable: bool = False) -> MappedColumn[Any]:
    if nullable:
        return mapped_column(DateTime(timezone=True), nullable=True)
    return mapped_column(DateTime(timezone=True), server_default=func.now())


def now() -> datetime:
    return datetime.now(UTC)


def as_row(obj: DeclarativeBase) -> dict[str, Any]:
    """A model instance's column values, by column name (snake_case, as the API returns rows)."""
    return {
        column.name: getattr(obj, attr.key) for attr in obj.__mapper__.column_attrs for column in attr.columns
    }


async def rows(statement: Executable, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``statement`` in the current transaction; rows as dicts."""
    result = await session().execute(statement, dict(params or {}))
    return [dict(r) for r in result.mappings()]


async def nested(
    parents: Executable, children: Executable, field: str, *, on: str = "order_id"
) -> list[dict[str, Any]]:
    """Rows of ``parents``, each with its rows of ``children`` (matched on ``on``) as ``field``."""
    grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for child in await rows(children):
        grouped[child[on]].append(child)
    heads = await rows(parents)
    for head in heads:
        head[field] = grouped.get(head[on], [])
    return heads


async def upsert(model: type[DeclarativeBase], values: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``values`` into ``model``'s table, overwriting rows with the same primary key."""
    if not values:
        return
    statement = insert(model).values([dict(v) for v in values])
    keys = [c.name for c in model.__mapper__.primary_key]
    given = set().union(*(v.keys() for v in values))
    updates = {c: statement.excluded[c] for c in given if c not in keys}
    await session().execute(
        statement.on_conflict_do_update(index_elements=keys, set_=updates)
        if updates
        else statement.on_conflict_do_nothing(index_elements=keys)
    )


async def clear(*models: type[DeclarativeBase]) -> None:
    """Delete every row of ``models`` (``/cleanup`` between benchmark runs)."""
    for model in models:
        await session().execute(delete(model))


_LEASE_REFUSED = "VL"  # SQLSTATE class of the core's lease refusals (expired, released, ...)


async def settle_quietly(action: Callable[[UUID], Awaitable[object]], lease_id: UUID) -> bool:
    """Consume or release a lease in a savepoint; ``False`` if it is no longer active.

    A refused settlement (the lease expired, was released or reaped) must not abort the
    caller's transaction: the savepoint confines the failed statement.
    """
    try:
        async with session().begin_nested():
            await action(lease_id)
    except DBAPIError as err:
        if str(getattr(err.orig, "sqlstate", "") or "").startswith(_LEASE_REFUSED):
            return False
        raise
    return True


def keys_of(items: Iterable[Any]) -> list[tuple[int, int]]:
    """``(seller_id, product_id)`` of each item, sorted: the order rows are locked in."""
    return sorted({(i.seller_id, i.product_id) for i in items})
