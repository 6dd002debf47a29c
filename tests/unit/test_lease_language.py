"""Unit tests for the @Lease language: parsing, error reporting and checks against descriptors."""

from __future__ import annotations

import pytest

from dbcore.descriptor import ColumnDescriptor, TableDescriptor
from dbcore.errors import LanguageError
from dbcore.lease_language import LeaseSpec, check_lease, parse_lease

PAPER = (
    "FROM StockItem s WHERE s.seller_id = :seller_id AND s.product_id = :product_id "
    "FOR UPDATE DECREMENT s.qty_available BY :qty WITH PERIOD :period"
)
TAIL = " FOR UPDATE DECREMENT s.qty BY :qty WITH PERIOD :period"
HEAD = "FROM StockItem s WHERE s.id = :id FOR UPDATE"
DEC = HEAD + " DECREMENT s.q"


def _col(name: str, type_: str, *, pk: bool = False) -> ColumnDescriptor:
    return ColumnDescriptor(name=name, type=type_, nullable=not pk, primary_key=pk)


STOCK = TableDescriptor(
    name="stock_item",
    entity="StockItem",
    columns=(
        _col("seller_id", "INTEGER", pk=True),
        _col("product_id", "BIGINT", pk=True),
        _col("qty_available", "INTEGER"),
        _col("price", "NUMERIC(10, 2)"),
        _col("weight", "DOUBLE PRECISION"),
        _col("name", "VARCHAR"),
        _col("updated_at", "TIMESTAMP WITH TIME ZONE"),
    ),
)
PRODUCT = TableDescriptor(
    name="product",
    entity="Product",
    columns=(_col("id", "INTEGER", pk=True), _col("qty", "SMALLINT"), _col("sku", "TEXT")),
)
PARAMS = ("seller_id", "product_id", "qty", "period", "self")


def _error(text: str) -> LanguageError:
    with pytest.raises(LanguageError) as info:
        parse_lease(text)
    return info.value


def _check_error(text: str, params: tuple[str, ...] = PARAMS) -> LanguageError:
    with pytest.raises(LanguageError) as info:
        check_lease(parse_lease(text), tables=[PRODUCT, STOCK], params=params)
    return info.value


# --- parsing ---------------------------------------------------------------------------------


def test_paper_example() -> None:
    spec = parse_lease(PAPER)
    assert spec == LeaseSpec(
        text=PAPER,
        entity="StockItem",
        alias="s",
        keys=(("seller_id", "seller_id"), ("product_id", "product_id")),
        column="qty_available",
        amount_param="qty",
        period_param="period",
    )
    assert spec.params == ("seller_id", "product_id", "qty", "period")
    assert check_lease(spec, tables=[PRODUCT, STOCK], params=PARAMS) is STOCK


def test_composite_keys_keep_written_order_and_mirrored_and_unqualified_forms() -> None:
    spec = parse_lease(
        "FROM StockItem AS s WHERE :p = s.product_id AND seller_id = :sid"
        " FOR UPDATE DECREMENT s.qty_available BY :n WITH PERIOD :ttl"
    )
    assert spec.keys == (("product_id", "p"), ("seller_id", "sid"))
    assert spec.params == ("p", "sid", "n", "ttl")


def test_params_deduplicated_in_first_appearance_order() -> None:
    text = "FROM Product p WHERE p.id = :x FOR UPDATE DECREMENT p.qty BY :x WITH PERIOD :x"
    spec = parse_lease(text)
    assert spec.params == ("x",)


def test_quoted_identifiers() -> None:
    spec = parse_lease(
        'FROM "StockItem" "S" WHERE "S"."seller_id" = :a AND "S".product_id = :b'
        ' FOR UPDATE DECREMENT "S"."qty_available" BY :q WITH PERIOD :t'
    )
    assert (spec.entity, spec.alias, spec.column) == ("StockItem", "S", "qty_available")
    assert spec.keys == (("seller_id", "a"), ("product_id", "b"))


def test_quoted_reserved_words_and_keywords_after_dot() -> None:
    spec = parse_lease(
        'FROM "from" "where" WHERE "where".id = :id FOR UPDATE DECREMENT "where".by BY :n WITH PERIOD :t'
    )
    assert (spec.entity, spec.alias, spec.column) == ("from", "where", "by")


def test_keywords_are_case_insensitive_and_whitespace_and_comments_free() -> None:
    text = (
        "from StockItem s\n  where s.seller_id=:a and s.product_id = :b -- the row\n"
        "  For Update Decrement s.qty_available by :q With Period :t"
    )
    spec = parse_lease(text)
    assert spec.keys == (("seller_id", "a"), ("product_id", "b"))
    assert (spec.amount_param, spec.period_param) == ("q", "t")


def test_spec_is_frozen() -> None:
    spec = parse_lease(PAPER)
    with pytest.raises(AttributeError):
        spec.column = "x"  # type: ignore[misc]


# --- syntax errors: token, position and message ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "token", "message"),
    [
        ("", "end of text", "expected FROM"),
        ("   ", "end of text", "expected FROM"),
        ("SELECT * FROM StockItem", "SELECT", "expected FROM"),
        ("FROM", "end of text", "expected an entity name"),
        ("FROM 42 s", "42", "expected an entity name"),
        ("FROM StockItem WHERE s.id = :id" + TAIL, "WHERE", "expected an alias"),
        ("FROM StockItem s s.id = :id" + TAIL, "s", "expected WHERE"),
        ("FROM StockItem s WHERE" + TAIL, "FOR", "condition must compare a column with a :param"),
        ("FROM StockItem s WHERE x.id = :id" + TAIL, "x", "unknown alias 'x'"),
        ("FROM StockItem s WHERE s.id = 5" + TAIL, "5", "condition must compare a column"),
        ("FROM StockItem s WHERE s.id = 'a'" + TAIL, "'a'", "condition must compare a column"),
        ("FROM StockItem s WHERE 5 = s.id" + TAIL, "5", "condition must compare a column"),
        ("FROM StockItem s WHERE s.id = s.x" + TAIL, "s", "condition must compare a column"),
        ("FROM StockItem s WHERE s.id = $1" + TAIL, "$", "condition must compare a column"),
        ("FROM StockItem s WHERE s.id > :id" + TAIL, ">", "only compare with '='"),
        ("FROM StockItem s WHERE s.id <> :id" + TAIL, "<>", "only compare with '='"),
        ("FROM StockItem s WHERE s.id IN (:id)" + TAIL, "IN", "only compare with '='"),
        ("FROM StockItem s WHERE s.id = : id" + TAIL, "id", "parameter name right after ':'"),
        ("FROM StockItem s WHERE s.id = :1" + TAIL, "1", "parameter name right after ':'"),
        ("FROM StockItem s WHERE s. = :id" + TAIL, "=", "expected a column name after '.'"),
        ("FROM StockItem s WHERE s.a = :a OR s.b = :b" + TAIL, "OR", "OR is not allowed"),
        ("FROM StockItem s WHERE (s.a = :a)" + TAIL, "(", "condition must compare a column"),
        ("FROM StockItem s WHERE s.a = :a AND s.a = :b" + TAIL, "s", "'a' appears twice"),
        ("FROM StockItem s WHERE s.a = :a AND s.b = :a" + TAIL, ":", "used for two key columns"),
        ("FROM StockItem s WHERE s.id = :id", "end of text", "expected FOR"),
        ("FROM StockItem s WHERE s.id = :id FOR SHARE", "SHARE", "expected UPDATE"),
        (HEAD, "end of text", "expected DECREMENT"),
        (HEAD + " SET s.q = 1", "SET", "expected DECREMENT"),
        (HEAD + " DECREMENT t.q BY :q WITH PERIOD :p", "t", "unknown alias 't'"),
        (DEC + " :q", ":", "expected BY"),
        (DEC + " BY 3", "3", "amount"),
        (DEC + " BY :q", "end of text", "expected WITH"),
        (DEC + " BY :q WITH :p", ":", "expected PERIOD"),
        (DEC + " BY :q WITH PERIOD '1 h'", "'1 h'", "period"),
        (DEC + " BY :q WITH PERIOD :p; DROP TABLE x", ";", "unexpected text after the lease"),
        (DEC + " BY :q; DROP TABLE x", ";", "expected WITH"),
        (DEC + " BY :q WITH PERIOD :p::int", "::", "unexpected text"),
        ("FROM StockItem s WHERE s.id = :id' OR '1'='1", "' OR '", "expected FOR"),
        ("FROM StockItem s WHERE s.id = :id' OR 1=1", "' OR 1=1", "unterminated quote"),
        ('FROM "StockItem s WHERE', '"StockItem s WHERE', "unterminated quote"),
        ("FROM StockItem s /* WHERE", "/* WHERE", "unterminated quote or comment"),
        ('FROM "" s', '""', "expected an entity name"),
    ],
)
def test_syntax_errors(text: str, token: str, message: str) -> None:
    err = _error(text)
    assert err.token == token
    assert message in str(err)
    assert err.text == text
    if token == "end of text":
        assert err.position == len(text)
    else:
        assert text[err.position :].startswith(token)


def test_error_position_points_at_the_offending_token() -> None:
    text = PAPER.replace("DECREMENT", "DECREASE")
    err = _error(text)
    assert (err.token, err.position) == ("DECREASE", text.index("DECREASE"))
    assert "expected DECREMENT" in str(err)
    assert isinstance(err, ValueError)


def test_garbage() -> None:
    for text in ["!!!", "FROM ??? x", "\x00", "FROM s s WHERE s.a = :a FOR UPDATE DECREMENT"]:
        with pytest.raises(LanguageError):
            parse_lease(text)


# --- checks against the service's tables -----------------------------------------------------


def test_check_matches_by_table_name_too() -> None:
    text = PAPER.replace("FROM StockItem", "FROM stock_item")
    assert check_lease(parse_lease(text), tables=[STOCK], params=PARAMS) is STOCK


@pytest.mark.parametrize("column", ["qty_available", "price", "weight"])
def test_check_accepts_numeric_columns(column: str) -> None:
    spec = parse_lease(PAPER.replace("s.qty_available", f"s.{column}"))
    assert check_lease(spec, tables=[STOCK], params=PARAMS) is STOCK


@pytest.mark.parametrize(
    ("text", "token", "message"),
    [
        (PAPER.replace("StockItem", "Stock"), "Stock", "entity 'Stock' is not a table of this"),
        (PAPER.replace("s.seller_id =", "s.seller =", 1), "seller", "'seller' does not exist"),
        (
            PAPER.replace("s.seller_id =", "s.qty_available =", 1),
            "qty_available",
            "not part of the primary key",
        ),
        (PAPER.replace("s.seller_id = :seller_id AND ", ""), "StockItem", "missing seller_id"),
        (PAPER.replace("s.qty_available", "s.qty"), "qty", "'qty' does not exist"),
        (
            PAPER.replace("s.qty_available", "s.product_id"),
            "product_id",
            "cannot DECREMENT key column",
        ),
        (PAPER.replace("s.qty_available", "s.name"), "name", "of type VARCHAR: it must be numeric"),
        (PAPER.replace("s.qty_available", "s.updated_at"), "updated_at", "must be numeric"),
        (PAPER.replace(":period", ":ttl"), "ttl", "parameter :ttl is not a parameter"),
    ],
)
def test_check_errors(text: str, token: str, message: str) -> None:
    err = _check_error(text)
    assert err.token == token
    assert message in str(err)
    assert text[err.position :].startswith(token)


def test_check_names_the_missing_function_parameter() -> None:
    err = _check_error(PAPER, params=("seller_id", "qty", "period"))
    assert err.token == "product_id"
    assert "parameter :product_id is not a parameter of the function" in str(err)
    assert PAPER[err.position - 1 :].startswith(":product_id")


def test_check_only_sees_the_service_own_tables() -> None:
    with pytest.raises(LanguageError, match="not a table of this service"):
        check_lease(parse_lease(PAPER), tables=[PRODUCT], params=PARAMS)


def test_check_hand_built_spec_reports_without_position() -> None:
    spec = LeaseSpec("n/a", "Product", "p", (("id", "id"),), "sku", "q", "t")
    with pytest.raises(LanguageError, match="must be numeric") as info:
        check_lease(spec, tables=[PRODUCT], params=("id", "q", "t"))
    assert (info.value.token, info.value.position) == ("sku", -1)
