"""Helpers every eShop service uses inside its transactions."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Executable,
    Numeric,
    bindparam,
    column,
    delete,
    func,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, Insert, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, mapped_column
from sqlalchemy.orm.properties import MappedColumn

from framework import session

__all__ = [
    "CENT",
    "OWN_KEY_GROUP",
    "RowsInsert",
    "as_row",
    "clear",
    "insert_rows",
    "keys_in",
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


def insert_rows(model: type[DeclarativeBase], values: Sequence[Mapping[str, Any]]) -> Insert:
    """The INSERT of ``values`` (rows, as dicts by column) into ``model``'s table, written as
    ``INSERT INTO t (a, b) SELECT r.a, r.b FROM unnest(:a, :b) AS r(a, b)``: one array
    parameter per column, of the column's type.

    Why not ``insert(model).values(values)``: an INSERT of n VALUES rows carries n rows of
    parameters in its text. SQLAlchemy cannot cache such a statement (it compiles it again on
    every execution), and Postgres sees one statement per row count: asyncpg prepares each, and
    pg_stat_statements lists each. This one has one text whatever the number of rows: compiled
    once, prepared once per connection. Like ``values()``, columns left out get their defaults.
    On a hot path, build it once instead: :class:`RowsInsert`.

    Every row must name the same columns. Raises ``ValueError`` for no rows (leave the INSERT
    out), for rows naming different columns, or for a name that is not a column of the table.
    """
    if not values:
        raise ValueError(f"insert_rows({model.__name__}): no rows; leave the INSERT out instead")
    given = set(values[0])
    columns = _columns(model, given)
    if differ := [n for n, v in enumerate(values) if set(v) != given]:
        raise ValueError(f"insert_rows({model.__name__}): rows {differ} name other columns than row 0")
    arrays = [bindparam(c.key, [v[c.key] for v in values], type_=ARRAY(c.type), unique=True) for c in columns]
    return _insert_unnest(model, columns, arrays)


class RowsInsert:
    """:func:`insert_rows` built once, for a hot path: a module constant, run with
    :meth:`params` of the rows.

    ``RowsInsert(OrderLine, ["order_id", "quantity"])`` is ``INSERT INTO t (order_id, quantity)
    SELECT ... FROM unnest(:order_items_order_id, :order_items_quantity)``. Built per call, a
    statement costs SQLAlchemy its construction, coercion and cache key on every execution
    (about as much Python as the statement's whole round trip); built once, it is looked up in
    the compiled cache by a key computed once. :attr:`statement` can be extended once too
    (``.returning()``, ``.cte()``, ``.add_cte()``). Parameters are named ``<table>_<column>``,
    so the INSERTs of two tables compose into one statement without a clash.
    """

    __slots__ = ("_names", "statement")

    def __init__(self, model: type[DeclarativeBase], columns: Iterable[str]) -> None:
        table = model.__table__
        chosen = _columns(model, set(columns))
        self._names = {c.key: f"{table.name}_{c.key}" for c in chosen}
        arrays = [bindparam(self._names[c.key], type_=ARRAY(c.type)) for c in chosen]
        self.statement: Insert = _insert_unnest(model, chosen, arrays)

    def params(self, values: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        """The parameters that insert ``values`` (rows, as dicts naming at least the columns)."""
        return {name: [v[key] for v in values] for key, name in self._names.items()}


def _columns(model: type[DeclarativeBase], names: set[str]) -> list[Any]:
    """``names``' columns of ``model``'s table, in the table's order (one statement text whatever
    the order they were named in); ``ValueError`` for a name that is not a column."""
    table = model.__table__
    if unknown := names - set(table.c.keys()):
        raise ValueError(f"{model.__name__}: {sorted(unknown)} are not columns of {table}")
    return [c for c in table.c if c.key in names]


def _insert_unnest(model: type[DeclarativeBase], columns: Sequence[Any], arrays: Sequence[Any]) -> Insert:
    rows = _zipped(arrays, columns)
    return insert(model.__table__).from_select(columns, select(*rows.c))


def _zipped(arrays: Sequence[Any], columns: Sequence[Any]) -> Any:
    """``unnest(a, b, ...) AS r(a, b, ...)``: the arrays zipped into rows, each column named
    and typed as the matching one of ``columns``."""
    return func.unnest(*arrays).table_valued(*(column(c.name, c.type) for c in columns)).render_derived("r")


def keys_in(*columns: Any) -> ColumnElement[bool]:
    """``(a, b, ...) IN (rows of unnest(:a_list, :b_list, ...))``: the rows whose key is one of
    those the parameters list, each parameter an array named after its column plus ``_list``
    (``customer_id_list``). One statement text whatever the number of keys: an ``IN`` list of
    tuples is rendered anew for each length."""
    arrays = [bindparam(f"{c.name}_list", type_=ARRAY(c.type)) for c in columns]
    rows = _zipped(arrays, columns)
    return tuple_(*columns).in_(select(*rows.c))


async def upsert(model: type[DeclarativeBase], values: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``values`` into ``model``'s table, overwriting rows with the same primary key.

    Every row must name the same columns (see :func:`insert_rows`).
    """
    if not values:
        return
    statement = insert_rows(model, values)
    keys = [c.name for c in model.__mapper__.primary_key]
    updates = {c: statement.excluded[c] for c in values[0] if c not in keys}
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
