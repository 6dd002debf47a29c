"""The ``@Lease`` language: parse a lease text and check it against the service's own tables.

A lease reserves an amount of one numeric column of one row for a period, e.g.::

    FROM StockItem s WHERE s.seller_id = :seller_id AND s.product_id = :product_id
    FOR UPDATE DECREMENT s.qty_available BY :qty WITH PERIOD :period

Grammar (keywords case-insensitive, identifiers case-sensitive as written and may be
double-quoted)::

    lease  := FROM name [AS] name WHERE cond (AND cond)*
              FOR UPDATE DECREMENT colref BY param WITH PERIOD param
    cond   := colref '=' param | param '=' colref
    colref := [alias '.'] name
    param  := ':' name          (no space after the colon)

The text is split by sqlglot's Postgres tokenizer and parsed by a small recursive-descent parser.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlglot import Token, TokenError, TokenType
from sqlglot.dialects.postgres import Postgres

from dbcore.descriptor import TableDescriptor
from dbcore.errors import LanguageError

__all__ = ["LeaseSpec", "check_lease", "parse_lease"]

_END = "end of text"
_KEYWORDS = frozenset({"FROM", "AS", "WHERE", "AND", "OR", "NOT", "FOR", "UPDATE"}) | {
    "DECREMENT", "BY", "WITH", "PERIOD"
}  # fmt: skip
_NUMERIC = frozenset({"SMALLINT", "INTEGER", "INT", "BIGINT", "NUMERIC", "DECIMAL", "REAL"}) | {
    "FLOAT", "DOUBLE PRECISION", "DOUBLE", "INT2", "INT4", "INT8", "FLOAT4", "FLOAT8"
}  # fmt: skip


@dataclass(frozen=True)
class LeaseSpec:
    """A parsed lease: which row (``keys``) of ``entity`` to decrement, and by which parameters."""

    text: str
    entity: str
    alias: str
    keys: tuple[tuple[str, str], ...]
    column: str
    amount_param: str
    period_param: str

    @property
    def params(self) -> tuple[str, ...]:
        """Every parameter name, in order of first appearance, without duplicates."""
        names = [param for _, param in self.keys] + [self.amount_param, self.period_param]
        return tuple(dict.fromkeys(names))


class _Parser:
    """Recursive descent over sqlglot tokens; records where each name was written."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.positions: dict[tuple[str, str], int] = {}

    def fail(self, message: str, tok: Token | None = None) -> LanguageError:
        tok = tok if tok is not None else self.peek()
        if tok is None:
            return LanguageError(message, text=self.text, token=_END, position=len(self.text))
        raw = self.text[tok.start : tok.end + 1]
        return LanguageError(message, text=self.text, token=raw, position=tok.start)

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def at(self, keyword: str) -> bool:
        tok = self.peek()
        return tok is not None and _is_keyword(tok, keyword)

    def expect(self, *keywords: str) -> None:
        for keyword in keywords:
            if not self.at(keyword):
                raise self.fail(f"expected {keyword}")
            self.i += 1

    def name(self, what: str, *, after_dot: bool = False) -> tuple[str, int]:
        """An identifier: a word (not a keyword of the grammar, unless after a dot) or quoted."""
        tok = self.peek()
        if tok is None or not _is_name(tok, after_dot=after_dot):
            raise self.fail(f"expected {what}")
        self.i += 1
        return tok.text, tok.start

    def param(self, what: str) -> tuple[str, Token]:
        """``:name`` written without a space, ``name`` a plain identifier; returns the colon too."""
        colon = self.peek()
        if colon is None or colon.token_type != TokenType.COLON:
            raise self.fail(f"expected a :parameter for {what}")
        self.i += 1
        tok = self.peek()
        if (
            tok is None
            or tok.start != colon.end + 1
            or tok.token_type in (TokenType.IDENTIFIER, TokenType.STRING)
            or not tok.text.isidentifier()
        ):
            raise self.fail("expected a parameter name right after ':'")
        self.i += 1
        self.positions.setdefault(("param", tok.text), tok.start)
        return tok.text, colon

    def colref(self, alias: str) -> tuple[str, int]:
        """``[alias.]column``; the alias, when written, must be the one declared after FROM."""
        first = self.peek()
        name, pos = self.name("a column")
        nxt = self.peek()
        if nxt is None or nxt.token_type != TokenType.DOT:
            return name, pos
        if name != alias:
            raise self.fail(f"unknown alias {name!r} (the entity's alias is {alias!r})", first)
        self.i += 1
        return self.name("a column name after '.'", after_dot=True)

    def condition(self, alias: str) -> tuple[str, int, str, Token]:
        """``colref = :param`` or ``:param = colref``: (column, its offset, param, its colon)."""
        start = self.peek()
        if start is not None and start.token_type == TokenType.COLON:
            param, colon = self.param("the key")
            self.equals()
            column, pos = self.colref(alias)
            return column, pos, param, colon
        if start is None or not _is_name(start, after_dot=False):
            raise self.fail("condition must compare a column with a :parameter")
        column, pos = self.colref(alias)
        self.equals()
        nxt = self.peek()
        if nxt is None or nxt.token_type != TokenType.COLON:
            raise self.fail("condition must compare a column with a :parameter")
        param, colon = self.param("the key")
        return column, pos, param, colon

    def equals(self) -> None:
        tok = self.peek()
        if tok is None or tok.token_type != TokenType.EQ:
            raise self.fail("expected '=' (a lease condition may only compare with '=')")
        self.i += 1

    def parse(self) -> LeaseSpec:
        self.expect("FROM")
        entity, pos = self.name("an entity name after FROM")
        self.positions[("entity", entity)] = pos
        if self.at("AS"):
            self.i += 1
        alias, _ = self.name("an alias for the entity")
        self.expect("WHERE")
        keys: list[tuple[str, str]] = []
        while True:
            tok = self.peek()
            column, pos, param, colon = self.condition(alias)
            if column in dict(keys):
                raise self.fail(f"column {column!r} appears twice in WHERE", tok)
            if param in (p for _, p in keys):
                raise self.fail(f"parameter :{param} is used for two key columns", colon)
            keys.append((column, param))
            self.positions[("key", column)] = pos
            if self.at("OR"):
                raise self.fail("OR is not allowed: a lease holds one row, join keys with AND")
            if not self.at("AND"):
                break
            self.i += 1
        self.expect("FOR", "UPDATE", "DECREMENT")
        column, pos = self.colref(alias)
        self.positions[("column", column)] = pos
        self.expect("BY")
        amount, _ = self.param("the amount (BY :param)")
        self.expect("WITH", "PERIOD")
        period, _ = self.param("the period (WITH PERIOD :param)")
        if self.peek() is not None:
            raise self.fail("unexpected text after the lease (it must end with WITH PERIOD :param)")
        return LeaseSpec(self.text, entity, alias, tuple(keys), column, amount, period)


def _is_name(tok: Token, *, after_dot: bool) -> bool:
    if tok.token_type == TokenType.IDENTIFIER:
        return tok.text != ""
    return (
        tok.token_type != TokenType.STRING
        and tok.text.isidentifier()
        and (after_dot or tok.text.upper() not in _KEYWORDS)
    )


def _is_keyword(tok: Token, keyword: str) -> bool:
    return tok.token_type not in (TokenType.IDENTIFIER, TokenType.STRING) and (tok.text.upper() == keyword)


def _tokenize(text: str) -> list[Token]:
    tokenizer = Postgres.tokenizer_class(dialect="postgres")
    try:
        return list(tokenizer.tokenize(text))
    except TokenError:
        done: list[Token] = list(getattr(tokenizer, "tokens", []))
        pos = done[-1].end + 1 if done else 0
        while pos < len(text) and text[pos].isspace():
            pos += 1
        raise LanguageError(
            "unterminated quote or comment",
            text=text,
            token=text[pos : pos + 20] or _END,
            position=pos,
        ) from None


def parse_lease(text: str) -> LeaseSpec:
    """Parse a ``@Lease`` text; raise :class:`LanguageError` pointing at the offending token."""
    return _Parser(text).parse()


def _is_numeric(sql_type: str) -> bool:
    base = sql_type.split("(", 1)[0].strip().upper()
    return base in _NUMERIC


def check_lease(
    spec: LeaseSpec, *, tables: Sequence[TableDescriptor], params: Collection[str]
) -> TableDescriptor:
    """Check ``spec`` against the service's own ``tables`` and the function's ``params``.

    The entity must be one of ``tables`` (by entity or table name), the keys exactly its primary
    key, the decremented column numeric and not a key. Returns the matched table.
    """
    try:
        positions = _positions(spec.text)
    except LanguageError:  # a hand-built spec: report without offsets
        positions = {}

    def error(message: str, kind: str, token: str) -> LanguageError:
        where = positions.get((kind, token), -1)
        return LanguageError(message, text=spec.text, token=token, position=where)

    table = next((t for t in tables if spec.entity in (t.entity, t.name)), None)
    if table is None:
        raise error(f"entity {spec.entity!r} is not a table of this service", "entity", spec.entity)
    primary = [c.name for c in table.columns if c.primary_key]
    for column, _ in spec.keys:
        if table.column(column) is None:
            raise error(f"column {column!r} does not exist in table {table.name!r}", "key", column)
        if column not in primary:
            raise error(
                f"key column {column!r} is not part of the primary key of {table.name!r} "
                f"({', '.join(primary) or 'none'}): a lease holds exactly one row",
                "key",
                column,
            )
    missing = [c for c in primary if c not in dict(spec.keys)]
    if missing:
        raise error(
            f"the WHERE clause must fix every primary-key column of {table.name!r}; "
            f"missing {', '.join(missing)}",
            "entity",
            spec.entity,
        )
    target = table.column(spec.column)
    if target is None:
        raise error(f"column {spec.column!r} does not exist in table {table.name!r}", "column", spec.column)
    if spec.column in primary:
        raise error(f"cannot DECREMENT key column {spec.column!r}", "column", spec.column)
    if not _is_numeric(target.type):
        raise error(
            f"cannot DECREMENT column {spec.column!r} of type {target.type}: it must be numeric",
            "column",
            spec.column,
        )
    for name in spec.params:
        if name not in params:
            raise error(f"parameter :{name} is not a parameter of the function", "param", name)
    return table


def _positions(text: str) -> dict[tuple[str, str], int]:
    parser = _Parser(text)
    parser.parse()
    return parser.positions
