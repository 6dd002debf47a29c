"""The eShop's statements built once: none gains a SET or VALUES column from its parameters.

SQLAlchemy reads the names of the parameters an INSERT or UPDATE is executed with as columns to
write: a parameter named like a column of a table the statement writes (its own or a CTE's),
that its ``values()`` do not already bind, becomes one more ``SET column = :name``. A WHERE key
``bindparam("customer_id")`` in ``UPDATE ... WHERE customer_id = :customer_id`` would rewrite the
key, and an order's ``:customer`` (its customer's id) would overwrite the order's ``customer``
reference. So every statement the sample builds once must compile to the same text with its
parameters named as without them; keys are named ``by_<column>`` for that reason.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

import pytest
from sqlalchemy import Executable, bindparam, select, update
from sqlalchemy.dialects.postgresql import asyncpg

import vmsdb_eshop.services as services
from vmsdb_eshop.services.cart import CartLine, CartRecord
from vmsdb_eshop.services.common import RowsInsert
from vmsdb_eshop.services.order import _advancing
from vmsdb_eshop.services.seller import _setting

DIALECT = asyncpg.dialect()


def built_once() -> Iterator[tuple[str, Executable]]:
    """Every statement a service module keeps as a constant (alone, in a dict, or in a
    :class:`RowsInsert`), and those its cached builders make for the column sets used."""
    for info in pkgutil.iter_modules(services.__path__):
        module = importlib.import_module(f"{services.__name__}.{info.name}")
        for name, value in vars(module).items():
            where = f"{info.name}.{name}"
            if isinstance(value, Executable):
                yield where, value
            elif isinstance(value, RowsInsert):
                yield where, value.statement
            elif isinstance(value, dict) and value and all(isinstance(v, Executable) for v in value.values()):
                yield from ((f"{where}[{key}]", statement) for key, statement in value.items())
    for names in [("order_status",), ("order_status", "shipment_date")]:
        yield f"seller._setting{names}", _setting(names)
    for dates in [(), ("payment_date",), ("delivered_carrier_date",), ("delivered_customer_date",)]:
        yield f"order._advancing{dates}", _advancing(dates)


def parameters_as_columns(statement: Executable) -> str | None:
    """What executing ``statement`` with its parameters adds to it, or ``None``."""
    compiled = statement.compile(dialect=DIALECT)
    names = sorted(key for key, bind in compiled.binds.items() if bind.required and not key.startswith("%("))
    with_names = str(statement.compile(dialect=DIALECT, column_keys=names))
    return None if with_names == str(compiled) else with_names


STATEMENTS = dict(built_once())


def test_the_sample_builds_its_hot_statements_once() -> None:
    assert len(STATEMENTS) >= 30, sorted(STATEMENTS)


@pytest.mark.parametrize("where", sorted(STATEMENTS))
def test_no_parameter_is_read_as_a_column(where: str) -> None:
    assert parameters_as_columns(STATEMENTS[where]) is None


def test_the_check_sees_a_key_named_as_a_column_of_a_cte() -> None:
    customer = bindparam("customer_id")  # the trap: a column of carts, which the CTE updates
    opened = (
        update(CartRecord)
        .where(CartRecord.customer_id == customer)
        .values(status="open")
        .returning(CartRecord.customer_id)
        .cte("opened")
    )
    statement = select(CartLine.lease_id).join(opened, CartLine.customer_id == opened.c.customer_id)
    added = parameters_as_columns(statement)
    assert added is not None and "SET customer_id=" in added
    renamed = (
        update(CartRecord).where(CartRecord.customer_id == bindparam("by_customer")).values(status="open")
    )
    assert (
        parameters_as_columns(
            select(CartLine.lease_id).join(renamed.cte("opened"), CartLine.customer_id == 1)
        )
        is None
    )
