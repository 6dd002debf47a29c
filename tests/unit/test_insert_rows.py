"""The eShop's ``insert_rows``: one cacheable statement text whatever the number of rows."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy.dialects.postgresql import asyncpg

from vmsdb_eshop.services.common import insert_rows
from vmsdb_eshop.services.payment import OrderPayment
from vmsdb_eshop.services.seller import SellerRecord

DIALECT = asyncpg.dialect()


def payment(sequential: int) -> dict[str, object]:
    return {
        "customer_id": 1,
        "order_id": 2,
        "sequential": sequential,
        "tid": "t",
        "type": "VOUCHER",
        "installments": 1,
        "value": Decimal("1.50"),
        "status": "succeeded",
    }


def test_one_row_and_three_rows_share_a_cache_key_and_a_text() -> None:
    one = insert_rows(OrderPayment, [payment(1)])
    # Another number of rows, the dicts' keys in another order.
    three = insert_rows(OrderPayment, [dict(reversed(payment(n).items())) for n in (1, 2, 3)])
    key_one, key_three = one._generate_cache_key(), three._generate_cache_key()
    assert key_one is not None and key_one == key_three
    assert str(one.compile(dialect=DIALECT)) == str(three.compile(dialect=DIALECT))
    params = three.compile(dialect=DIALECT).params
    assert [v for k, v in params.items() if k.startswith("sequential")] == [[1, 2, 3]]


def test_the_columns_are_typed_arrays_and_the_rows_come_from_unnest() -> None:
    text = " ".join(str(insert_rows(OrderPayment, [payment(1)]).compile(dialect=DIALECT)).split())
    assert "FROM unnest(" in text
    assert "::NUMERIC(14, 2)[]" in text and "::VARCHAR(200)[]" in text
    assert "created_at" not in text  # left to its server default, as VALUES leaves it


def test_a_column_left_out_gets_its_default() -> None:
    statement = insert_rows(SellerRecord, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    compiled = statement.compile(dialect=DIALECT)
    # SQLAlchemy computes the Python-side default when it executes the INSERT, as for VALUES.
    assert "email" in [column.name for column in compiled.insert_prefetch]


def test_rows_that_name_other_columns_no_rows_and_unknown_columns_are_refused() -> None:
    with pytest.raises(ValueError, match=r"rows \[1\] name other columns"):
        insert_rows(SellerRecord, [{"id": 1, "name": "a"}, {"id": 2}])
    with pytest.raises(ValueError, match="no rows"):
        insert_rows(SellerRecord, [])
    with pytest.raises(ValueError, match="not columns"):
        insert_rows(SellerRecord, [{"id": 1, "nickname": "a"}])
