"""dbcore.translate: every driver error the core knows becomes its CoreError, in one place."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError

from dbcore.errors import (
    CoreError,
    EntityDeleted,
    EntityNotFound,
    IsolationError,
    ReadOnlyViolation,
    ServiceRecovering,
    TransactionConflict,
    TruncateRefused,
)
from dbcore.translate import conflict_kind, core_error, is_retryable, sqlstate_of, translate_error, translated

OWNERS = {"stock": "stock", "stock.stock_items": "stock", "cart": "cart", "cart.lines": "cart"}


class DriverError(Exception):
    """What asyncpg raises: the message, and the SQLSTATE as an attribute."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def wrapped(sqlstate: str, message: str, statement: str = "SELECT 1") -> DBAPIError:
    """The same error as SQLAlchemy hands it over, with the statement that failed."""
    return DBAPIError(statement, None, DriverError(sqlstate, message))


def test_the_sqlstate_is_read_through_either_layer() -> None:
    assert sqlstate_of(DriverError("40001", "x")) == "40001"
    assert sqlstate_of(wrapped("40P01", "x")) == "40P01"
    assert sqlstate_of(ValueError("not a database error")) is None


@pytest.mark.parametrize(("sqlstate", "kind"), [("40001", "serialization failure"), ("40P01", "deadlock")])
def test_conflicts_are_retryable_and_named(sqlstate: str, kind: str) -> None:
    err = wrapped(sqlstate, "could not serialize access")
    assert is_retryable(err) and conflict_kind(err) == kind
    conflict = translate_error(err, service="cart", table_owners=OWNERS)
    assert isinstance(conflict, TransactionConflict) and conflict.kind == kind
    assert "transaction of service 'cart' conflicted" in str(conflict)
    assert not is_retryable(wrapped("42501", "permission denied for table lines"))


def test_a_permission_error_names_the_service_the_table_and_its_owner() -> None:
    err = wrapped(
        "42501",
        "permission denied for table stock_items",
        "UPDATE stock.stock_items SET qty = qty - 1 WHERE id = $1",
    )
    isolation = translate_error(err, service="cart", table_owners=OWNERS)
    assert isinstance(isolation, IsolationError) and isinstance(isolation, PermissionError)
    assert (isolation.service, isolation.owner, isolation.table, isolation.action) == (
        "cart",
        "stock",
        "stock.stock_items",
        "write",
    )
    schema = translate_error(
        wrapped("42501", "permission denied for schema stock"), service="cart", table_owners=OWNERS
    )
    assert isinstance(schema, IsolationError) and (schema.owner, schema.action) == ("stock", "access")


def test_a_write_in_a_read_only_transaction_says_how_to_allow_it() -> None:
    err = translate_error(
        wrapped("25006", "cannot execute INSERT in a read-only transaction"), service="cart", table_owners={}
    )
    assert isinstance(err, ReadOnlyViolation) and '@Transactional(type="RW")' in str(err)


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("VR404", EntityNotFound),
        ("VR410", EntityDeleted),
        ("VR503", ServiceRecovering),
        ("VR405", TruncateRefused),
    ],
)
def test_the_cores_own_codes_mean_the_same_whoever_ran_the_statement(
    sqlstate: str, kind: type[CoreError]
) -> None:
    raw = DriverError(sqlstate, "vms://stock/items/1 is gone")
    for err in (raw, wrapped(sqlstate, str(raw))):
        assert isinstance(core_error(err), kind)
        assert str(core_error(err)) == "vms://stock/items/1 is gone"
        assert isinstance(translate_error(err, service="cart", table_owners=OWNERS), kind)
    assert core_error(wrapped("42501", "permission denied for table lines")) is None


def test_translated_raises_the_core_error_from_the_drivers() -> None:
    err = wrapped("42501", "permission denied for table lines", "INSERT INTO cart.lines VALUES (1)")
    with pytest.raises(IsolationError) as caught, translated("stock", OWNERS):
        raise err
    assert caught.value.__cause__ is err and caught.value.owner == "cart"


def test_translated_leaves_what_it_does_not_know_alone() -> None:
    unknown, core = wrapped("23505", "duplicate key"), ReadOnlyViolation("already translated")
    for err in (unknown, core, KeyError("not a database error")):
        with pytest.raises(type(err)) as caught, translated("cart", OWNERS):
            raise err
        assert caught.value is err and caught.value.__cause__ is None


def test_without_a_service_only_the_cores_own_codes_are_translated() -> None:
    denied = wrapped("42501", "permission denied for table lines")
    with pytest.raises(DBAPIError), translated():
        raise denied  # left for the caller that knows whose transaction it was
    with pytest.raises(ServiceRecovering, match="stock is recovering"), translated():
        raise wrapped("VR503", "stock is recovering")
