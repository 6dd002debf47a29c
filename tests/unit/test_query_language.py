"""Unit tests for the ``@Query`` language compiler (no database)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import text as sa_text

from dbcore.descriptor import (
    ColumnDescriptor,
    ExportedFunctionDescriptor,
    ServiceDescriptor,
    TableDescriptor,
)
from dbcore.errors import LanguageError
from dbcore.query_language import (
    ListExpansion,
    QuerySpec,
    bind_values,
    compile_query,
    function_sql_name,
)

PAPER = (
    "FROM CustDiscount cd, Customer c JOIN c.id = cd.c_id WHERE c.id = :cust_id "
    "AND cd.disc_id IN (:discounts[id]) AND cd.expired() <> FALSE"
)
PARAMS = ("cust_id", "discounts", "name")


def _table(name: str, entity: str, *cols: str, exported: bool = False) -> TableDescriptor:
    columns = tuple(ColumnDescriptor(name=c, type="integer") for c in cols)
    return TableDescriptor(name=name, entity=entity, columns=columns, exported=exported)


CUSTOMER = ServiceDescriptor(
    name="customer",
    tables=(
        _table("customers", "Customer", "id", "name", exported=True),
        _table("cust_discounts", "CustDiscount", "c_id", "disc_id", exported=True),
        _table("secrets", "Secret", "id"),
    ),
    functions=(
        ExportedFunctionDescriptor(
            entity="CustDiscount", name="expired", returns="boolean", body="SELECT false"
        ),
    ),
)
ORDER = ServiceDescriptor(name="order", tables=(_table("orders", "Order", "id", "c_id"),))
CATALOG = (CUSTOMER, ORDER)


def compile_(text: str, catalog: tuple[ServiceDescriptor, ...] = CATALOG) -> QuerySpec:
    return compile_query(text, catalog=catalog, caller="order", params=PARAMS)


def fails(text: str, token: str, message: str = "") -> LanguageError:
    with pytest.raises(LanguageError) as info:
        compile_(text)
    assert info.value.token == token
    assert message in str(info.value)
    return info.value


def binds(sql: str) -> set[str]:
    return set(sa_text(sql).compile().params)


def test_paper_query_from_first() -> None:
    spec = compile_(PAPER)
    assert spec.sql == (
        'SELECT cd.* FROM "customer"."cust_discounts" AS cd, "customer"."customers" AS c '
        "WHERE c.id = cd.c_id AND (c.id = :cust_id AND cd.disc_id = ANY(:discounts__id) "
        'AND "customer"."cust_discounts__expired"(cd.*) <> FALSE)'
    )
    assert spec.params == ("cust_id", "discounts")
    assert spec.expansions == (ListExpansion(param="discounts", attr="id", bind="discounts__id"),)
    assert spec.entities == (("customer", "cust_discounts"), ("customer", "customers"))
    assert binds(spec.sql) == {"cust_id", "discounts__id"}


def test_from_first_keeps_real_joins_and_ors() -> None:
    spec = compile_(
        "FROM CustDiscount cd JOIN Customer c ON c.id = cd.c_id JOIN cd.disc_id > 1 OR "
        "cd.disc_id < 0 WHERE c.id = 1 OR c.id = 2 ORDER BY cd.disc_id LIMIT 3"
    )
    assert spec.sql == (
        'SELECT cd.* FROM "customer"."cust_discounts" AS cd JOIN "customer"."customers" AS c '
        "ON c.id = cd.c_id WHERE (cd.disc_id > 1 OR cd.disc_id < 0) AND (c.id = 1 OR c.id = 2) "
        "ORDER BY cd.disc_id LIMIT 3"
    )
    expected = 'SELECT Customer.* FROM "customer"."customers" AS Customer'
    assert compile_("FROM Customer").sql == expected


def test_plain_select() -> None:
    spec = compile_(
        "SELECT c.id, count(*) AS n FROM Customer c JOIN CustDiscount cd ON cd.c_id = c.id "
        "WHERE c.id = :cust_id GROUP BY c.id"
    )
    assert spec.sql == (
        'SELECT c.id, COUNT(*) AS n FROM "customer"."customers" AS c JOIN '
        '"customer"."cust_discounts" AS cd ON cd.c_id = c.id WHERE c.id = :cust_id GROUP BY c.id'
    )
    assert spec.params == ("cust_id",)
    assert spec.expansions == ()


def test_subqueries_ctes_unions_and_builtins() -> None:
    spec = compile_(
        "WITH recent AS (SELECT * FROM cust_discounts) "
        "SELECT lower(coalesce(c.name, 'x')), now() FROM Customer c "
        "WHERE EXISTS (SELECT 1 FROM recent r WHERE r.c_id = c.id AND r.disc_id > :cust_id) "
        "UNION SELECT 'a', now() FROM customer.Customer"
    )
    assert '"customer"."cust_discounts" AS cust_discounts' in spec.sql
    assert "FROM recent AS r" in spec.sql
    assert '"customer"."customers" AS Customer' in spec.sql
    assert spec.entities == (("customer", "cust_discounts"), ("customer", "customers"))


def test_own_private_table_allowed_and_reserved_name_quoted() -> None:
    spec = compile_("SELECT Order.id FROM Order WHERE Order.c_id = :cust_id")
    assert spec.sql == ('SELECT "order".id FROM "order"."orders" AS "order" WHERE "order".c_id = :cust_id')
    assert spec.entities == (("order", "orders"),)


def test_other_services_private_table_rejected() -> None:
    error = fails("SELECT s.id FROM Secret s", "Secret", "entity 'Secret' of service 'customer'")
    assert "is not exported" in str(error)
    assert error.position == 17
    fails("SELECT * FROM customer.secrets", "customer.secrets", "not exported")


def test_unknown_entity_and_service() -> None:
    fails("SELECT * FROM Nope", "Nope", "unknown entity")
    fails("SELECT * FROM pg_catalog.pg_authid", "pg_catalog", "unknown service")
    fails('SELECT * FROM "customer"', "customer", "unknown entity")  # quoted: case-sensitive


def test_ambiguous_entity_needs_qualification() -> None:
    other = ServiceDescriptor(name="crm", tables=(_table("people", "Customer", exported=True),))
    with pytest.raises(LanguageError, match=r"service\.Entity") as info:
        compile_("SELECT * FROM Customer", (*CATALOG, other))
    assert info.value.token == "Customer"
    spec = compile_("SELECT * FROM crm.Customer c", (*CATALOG, other))
    assert spec.sql == 'SELECT * FROM "crm"."people" AS c'


def test_quoted_identifiers() -> None:
    spec = compile_('SELECT "c"."id", \'a :b\' FROM "Customer" "c" WHERE "c"."name" = :name')
    assert spec.sql == (
        'SELECT "c"."id", \'a \\:b\' FROM "customer"."customers" AS "c" WHERE "c"."name" = :name'
    )
    assert binds(spec.sql) == {"name"}
    assert "'a :b'" in str(sa_text(spec.sql).compile())


def test_functions() -> None:
    assert function_sql_name("cust_discounts", "expired") == "cust_discounts__expired"
    fails("SELECT foo(1) FROM Customer", "foo", "unknown function")
    fails("SELECT c.expired() FROM Customer c", "expired", "unknown function")
    fails("SELECT x.expired() FROM Customer c", "expired", "unknown function")
    fails("SELECT pg_catalog.pg_sleep(1) FROM Customer", "pg_sleep", "unknown function")
    fails("SELECT * FROM Customer WHERE set_config('a', 'b', true) = ''", "set_config")


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("INSERT INTO Customer (id) VALUES (1)", "INSERT"),
        ("UPDATE Customer SET id = 1", "UPDATE"),
        ("DELETE FROM Customer", "DELETE"),
        ("DROP TABLE Customer", "DROP"),
        ("CREATE TABLE x (id int)", "CREATE"),
        ("SELECT * INTO t FROM Customer", "INTO"),
        ("SELECT * FROM Customer FOR UPDATE", "FOR UPDATE"),
        ("SELECT * FROM Customer c FOR SHARE", "FOR SHARE"),
        ("WITH d AS (DELETE FROM customers RETURNING *) SELECT * FROM d", "DELETE"),
        ("SELECT 1; SELECT 2", "SELECT"),
        ("SELECT * FROM Customer; DROP TABLE x", "DROP"),
    ],
)
def test_reads_only(text: str, token: str) -> None:
    fails(text, token)


def test_parameters() -> None:
    fails("SELECT * FROM Customer c WHERE c.id = :y", ":y", "unknown parameter")
    fails("SELECT * FROM Customer c WHERE c.id = ?", "?")
    fails("SELECT * FROM Customer c WHERE c.id = $1", "$1")
    spec = compile_("SELECT * FROM Customer c WHERE c.id = :cust_id::int AND c.name = :name")
    assert spec.sql.endswith("WHERE c.id = CAST(:cust_id AS INT) AND c.name = :name")
    assert spec.params == ("cust_id", "name")


def test_injection_attempts() -> None:
    fails("SELECT * FROM Customer c WHERE c.id = :cust_id; DROP TABLE customers", "DROP")
    spec = compile_("SELECT * FROM Customer c WHERE c.id = :cust_id -- OR 1 = 1")
    assert "--" not in spec.sql and "OR" not in spec.sql
    spec = compile_("SELECT * FROM Customer c WHERE c.name = 'x'' OR ''1''=''1'")
    assert spec.sql.endswith("WHERE c.name = 'x'' OR ''1''=''1'")
    values = bind_values(compile_("SELECT * FROM Customer c WHERE c.name = :name"), {
        "name": "x'; DROP TABLE customers; --"
    })  # fmt: skip
    assert values == {"name": "x'; DROP TABLE customers; --"}


@dataclass
class Discount:
    id: int


def test_list_expansion_and_bind_values() -> None:
    spec = compile_(PAPER)
    values = bind_values(spec, {"cust_id": 7, "discounts": [Discount(1), {"id": 2}]})
    assert values["cust_id"] == 7
    assert values["discounts__id"] == [1, 2]
    with pytest.raises(LanguageError) as info:
        bind_values(spec, {"discounts": []})
    assert info.value.token == ":cust_id"
    with pytest.raises(LanguageError, match="no 'id'"):
        bind_values(spec, {"cust_id": 1, "discounts": [{"key": 1}]})
    twice = compile_(
        "SELECT * FROM Customer c WHERE c.id NOT IN (:discounts[id]) OR c.id IN (:discounts[id])"
    )
    assert twice.expansions == (ListExpansion("discounts", "id", "discounts__id"),)
    assert "NOT c.id = ANY(:discounts__id) OR c.id = ANY(:discounts__id)" in twice.sql


def test_list_expansion_misuse() -> None:
    fails("SELECT * FROM Customer c WHERE c.id = :discounts[id]", ":discounts[id]", "IN list")
    fails("SELECT * FROM Customer c WHERE c.id IN (:discounts[id], 3)", ":discounts[id]")
    fails("SELECT * FROM Customer c WHERE c.id IN (:discounts[1])", ":discounts[1]")
    fails("SELECT * FROM Customer c WHERE c.id IN (:nope[id])", ":nope", "unknown parameter")


def test_parse_errors_are_language_errors() -> None:
    with pytest.raises(LanguageError):
        compile_("FROM Customer c JOIN WHERE c.id = 1")
    with pytest.raises(LanguageError, match="empty"):
        compile_("   ")
