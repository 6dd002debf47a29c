"""The ``@Query`` language: read-only SQL over entity names, compiled to executable Postgres SQL.

Two forms are accepted. Ordinary SQL (``SELECT``, joins, subqueries, ``WITH ... SELECT``,
``UNION``), and the FROM-first form of the research paper::

    FROM CustDiscount cd, Customer c JOIN c.id = cd.c_id
    WHERE c.id = :cust_id AND cd.disc_id IN (:discounts[id]) AND cd.expired() <> FALSE

which means ``SELECT cd.* FROM cd, c WHERE (c.id = cd.c_id) AND (<where>)``: the select list is
the first entity's row and a bare ``JOIN <condition>`` is ANDed in front of the WHERE clause.

Compilation (sqlglot, Postgres dialect) resolves every entity in the catalog and rewrites it to
``"<service>"."<table>"``, rewrites ``alias.fn()`` to the owner's exported SQL function, turns
``x IN (:list[attr])`` into ``x = ANY(:list__attr)`` and rejects anything that is not a plain
read. The output is meant for ``sqlalchemy.text()``: binds are ``:name`` and every other colon
is escaped as ``\\:``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlalchemy import text as sa_text
from sqlglot import Token, TokenError, TokenType, exp
from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import ParseError
from sqlglot.generators.postgres import PostgresGenerator

from dbcore.descriptor import ServiceDescriptor, TableDescriptor
from dbcore.errors import LanguageError

__all__ = ["ListExpansion", "QuerySpec", "bind_values", "compile_query", "function_sql_name"]

_DIALECT = Postgres()
_CLAUSE_END = frozenset({
    TokenType.WHERE, TokenType.GROUP_BY, TokenType.HAVING, TokenType.ORDER_BY, TokenType.LIMIT,
    TokenType.OFFSET, TokenType.FETCH, TokenType.WINDOW, TokenType.QUALIFY, TokenType.UNION,
    TokenType.INTERSECT, TokenType.EXCEPT, TokenType.JOIN, TokenType.SEMICOLON, TokenType.FOR,
})  # fmt: skip
_JOIN_MODIFIERS = frozenset({
    TokenType.LEFT, TokenType.RIGHT, TokenType.FULL, TokenType.INNER, TokenType.OUTER,
    TokenType.CROSS, TokenType.NATURAL, TokenType.LATERAL, TokenType.ANTI, TokenType.SEMI,
})  # fmt: skip
_SET_OPS = frozenset({TokenType.UNION, TokenType.INTERSECT, TokenType.EXCEPT})
# Postgres reserved words (SQL key words appendix): unquoted, they must be written quoted.
_PG_RESERVED = frozenset({
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric",
    "authorization", "binary", "both", "case", "cast", "check", "collate", "collation", "column",
    "concurrently", "constraint", "create", "cross", "current_catalog", "current_date",
    "current_role", "current_schema", "current_time", "current_timestamp", "current_user",
    "default", "deferrable", "desc", "distinct", "do", "else", "end", "except", "false", "fetch",
    "for", "foreign", "freeze", "from", "full", "grant", "group", "having", "ilike", "in",
    "initially", "inner", "intersect", "into", "is", "isnull", "join", "lateral", "leading",
    "left", "like", "limit", "localtime", "localtimestamp", "natural", "not", "notnull", "null",
    "offset", "on", "only", "or", "order", "outer", "overlaps", "placing", "primary",
    "references", "returning", "right", "select", "session_user", "similar", "some", "symmetric",
    "system_user", "table", "tablesample", "then", "to", "trailing", "true", "union", "unique",
    "user", "using", "variadic", "verbose", "when", "where", "window", "with",
})  # fmt: skip
_WRITES = (exp.DML, exp.DDL, exp.Drop, exp.Alter, exp.Command, exp.Into, exp.Lock)

Binding = tuple[ServiceDescriptor, TableDescriptor]


@dataclass(frozen=True)
class ListExpansion:
    """``:param[attr]`` in an ``IN`` list: bound as the list of ``attr`` of each element."""

    param: str
    attr: str
    bind: str


@dataclass(frozen=True)
class QuerySpec:
    """A compiled query: ``sql`` runs through ``sqlalchemy.text()`` with ``bind_values``."""

    text: str
    sql: str
    params: tuple[str, ...]
    expansions: tuple[ListExpansion, ...]
    entities: tuple[tuple[str, str], ...]


def function_sql_name(table: str, function: str) -> str:
    """Name of the SQL function the core creates in the owner's schema for an exported function."""
    return f"{table}__{function}"


class _Generator(PostgresGenerator):
    """Postgres SQL with ``:name`` binds; colons inside literals/identifiers escaped for text()."""

    def placeholder_sql(self, expression: exp.Placeholder) -> str:
        return f":{expression.name}"

    def literal_sql(self, expression: exp.Literal) -> str:
        return super().literal_sql(expression).replace(":", "\\:")

    def identifier_sql(self, expression: exp.Identifier) -> str:
        if not expression.quoted and expression.name.lower() in _PG_RESERVED:
            return f'"{expression.name.lower()}"'  # what Postgres would fold it to
        return super().identifier_sql(expression).replace(":", "\\:")


def _fold(ident: exp.Identifier) -> str:
    """Postgres identifier semantics: unquoted names fold to lower case."""
    return ident.name if ident.quoted else ident.name.lower()


class _Compiler:
    """One compilation: the checks and AST rewrites, and what they found along the way."""

    def __init__(
        self, text: str, catalog: Sequence[ServiceDescriptor], caller: str, params: Collection[str]
    ) -> None:
        self.text, self.catalog, self.caller, self.allowed = text, catalog, caller, set(params)
        self.scopes: dict[int, dict[str, Binding]] = {}
        self.entities: dict[tuple[str, str], None] = {}
        self.expansions: dict[tuple[str, str], ListExpansion] = {}
        self.binds: dict[str, None] = {}
        self.lexical: list[str] = []  # parameter names in order of appearance
        self.written: dict[str, str] = {}  # ``:name[...]`` exactly as first written

    def fail(self, message: str, token: str) -> LanguageError:
        pos = self.text.find(token)
        if pos < 0:
            pos = self.text.lower().find(token.split()[0].lower()) if token.strip() else -1
        return LanguageError(message, text=self.text, token=token, position=pos)

    # -- lexical pre-pass -------------------------------------------------------------------
    def tokenize(self) -> list[Token]:
        try:
            tokens = _DIALECT.tokenize(self.text)
        except TokenError as err:
            raise LanguageError(f"cannot tokenize query: {err}", text=self.text) from err
        if not tokens:
            raise LanguageError("empty query", text=self.text)
        for i, tok in enumerate(tokens[:-1]):
            if tok.token_type == TokenType.SEMICOLON:
                nxt = tokens[i + 1]
                if nxt.token_type != TokenType.SEMICOLON:
                    raise LanguageError(
                        "a query is exactly one statement", text=self.text,
                        token=self.text[nxt.start : nxt.end + 1], position=nxt.start,
                    )  # fmt: skip
            nxt = tokens[i + 1]
            if tok.token_type == TokenType.COLON and nxt.start == tok.end + 1:
                self.lexical.append(nxt.text)
                end = i + 2
                if end < len(tokens) and tokens[end].token_type == TokenType.L_BRACKET:
                    while end < len(tokens) and tokens[end].token_type != TokenType.R_BRACKET:
                        end += 1
                    last = tokens[min(end, len(tokens) - 1)]
                    self.written.setdefault(nxt.text, self.text[tok.start : last.end + 1])
        return tokens

    def from_first(self, tokens: list[Token]) -> tuple[str, list[exp.Expr]]:
        """Turn ``FROM ... JOIN <cond> ...`` into ``SELECT * FROM ...`` plus the conditions."""
        depth, cuts, conditions, i = 0, [], [], 0

        def starts_join(k: int) -> bool:
            while k < len(tokens) and tokens[k].token_type in _JOIN_MODIFIERS:
                k += 1
            return k < len(tokens) and tokens[k].token_type == TokenType.JOIN

        while i < len(tokens):
            kind = tokens[i].token_type
            depth += (kind == TokenType.L_PAREN) - (kind == TokenType.R_PAREN)
            if depth == 0 and kind in _SET_OPS:
                break
            if depth != 0 or kind != TokenType.JOIN or tokens[i - 1].token_type in _JOIN_MODIFIERS:
                i += 1
                continue
            j, level, plain = i + 1, 0, True
            while j < len(tokens):
                kj = tokens[j].token_type
                level += (kj == TokenType.L_PAREN) - (kj == TokenType.R_PAREN)
                if level == 0 and (kj in _CLAUSE_END or starts_join(j)):
                    break
                plain = plain and not (level == 0 and kj in (TokenType.ON, TokenType.USING))
                j += 1
            if plain:
                if j == i + 1:
                    raise self.fail("JOIN needs a condition", tokens[i].text)
                cond = self.text[tokens[i + 1].start : tokens[j - 1].end + 1]
                try:
                    conditions.append(exp.condition(cond, dialect=_DIALECT))
                except ParseError as err:
                    raise self.fail(f"cannot parse join condition: {err.errors[0]}", cond) from err
                cuts.append((tokens[i].start, tokens[j - 1].end + 1))
            i = j
        pieces, last = ["SELECT * "], 0
        for start, end in cuts:
            pieces += [self.text[last:start], " "]
            last = end
        return "".join([*pieces, self.text[last:]]), conditions

    # -- checks and rewrites ----------------------------------------------------------------
    def parse(self, sql: str, first: Token) -> exp.Query:
        try:
            statements = [s for s in sqlglot.parse(sql, dialect=_DIALECT) if s is not None]
        except ParseError as err:
            detail = err.errors[0] if err.errors else {}
            token = str(detail.get("highlight") or first.text)
            raise self.fail(f"cannot parse query: {detail.get('description', err)}", token) from err
        root = statements[0] if len(statements) == 1 else None
        if not isinstance(root, exp.Query):
            raise self.fail("only read queries are allowed", self.text[first.start : first.end + 1])
        for node in root.walk():
            if isinstance(node, _WRITES):
                token = node.sql(dialect=_DIALECT) if isinstance(node, exp.Lock) else (
                    "INTO" if isinstance(node, exp.Into) else type(node).__name__.upper()
                )  # fmt: skip
                raise self.fail("only read queries are allowed", token)
        return root

    def resolve(self, table: exp.Table) -> Binding:
        ident = table.this
        written = f"{table.db}.{ident.name}" if table.db else ident.name
        if table.catalog:
            raise self.fail("qualify an entity as service.Entity only", written)
        services = list(self.catalog)
        if table.db:
            db = table.args["db"]
            services = [s for s in services if s.name in (db.name, _fold(db))][:1]
            if not services:
                raise self.fail("unknown service", db.name)
        levels: list[list[Binding]] = [
            [(s, t) for s in services for t in s.tables if t.entity == ident.name],
            [(s, t) for s in services for t in s.tables if t.name == ident.name],
        ]
        if not ident.quoted:
            low = ident.name.lower()
            levels.append([(s, t) for s in services for t in s.tables if t.entity.lower() == low])
            levels.append([(s, t) for s in services for t in s.tables if t.name.lower() == low])
        found = next((level for level in levels if level), None)
        if found is None:
            raise self.fail("unknown entity", written)
        owners = sorted({s.name for s, _ in found})
        if len(owners) > 1:
            raise self.fail(f"ambiguous entity (services {', '.join(owners)}): write service.Entity", written)
        service, desc = found[0]
        if service.name != self.caller and not desc.exported:
            raise self.fail(f"entity {ident.name!r} of service {service.name!r} is not exported", written)
        return service, desc

    def rewrite_tables(self, root: exp.Query) -> None:
        ctes = {_fold(c.args["alias"].this) for c in root.find_all(exp.CTE) if c.alias}
        tables = sorted(root.find_all(exp.Table), key=lambda t: int(t.this.meta.get("start", 0)))
        for table in tables:  # in order of appearance, as far as sqlglot recorded it
            ident = table.this
            if not isinstance(ident, exp.Identifier):
                continue  # a table function: checked with the other functions
            if not table.db and _fold(ident) in ctes:
                continue
            service, desc = self.resolve(table)
            self.entities[(service.name, desc.name)] = None
            alias = table.args.get("alias")
            if alias is None or not alias.this:
                alias = exp.TableAlias(this=ident.copy())
                table.set("alias", alias)
            table.set("this", exp.Identifier(this=desc.name, quoted=True))
            table.set("db", exp.Identifier(this=service.name, quoted=True))
            select = table.find_ancestor(exp.Select)
            self.scopes.setdefault(id(select), {})[_fold(alias.this)] = (service, desc)

    def rewrite_functions(self, root: exp.Query) -> None:
        for func in root.find_all(exp.Anonymous, exp.AnonymousAggFunc):
            if not (isinstance(func.parent, exp.Dot) and func.arg_key == "expression"):
                raise self.fail("unknown function", func.name)
        for dot in list(root.find_all(exp.Dot)):
            func = dot.expression
            if not isinstance(func, exp.Func):
                continue
            name = func.name if isinstance(func, exp.Anonymous) else func.sql_name().lower()
            owner = dot.this
            if isinstance(owner, exp.Column) and not owner.table:
                owner = owner.this
            binding = self.lookup(dot, owner) if isinstance(owner, exp.Identifier) else None
            fn = None
            if binding is not None:
                service, desc = binding
                fn = next(
                    (f for f in service.functions if f.entity in (desc.entity, desc.name)
                     and name in (f.name, f.name.lower())),
                    None,
                )  # fmt: skip
            if fn is None or binding is None or not isinstance(owner, exp.Identifier):
                raise self.fail("unknown function", name)
            if not isinstance(func, exp.Anonymous) or func.expressions:
                raise self.fail("an exported function takes no arguments", name)
            call = exp.Anonymous(
                this=exp.Identifier(this=function_sql_name(desc.name, fn.name), quoted=True),
                expressions=[exp.Column(this=exp.Star(), table=owner.copy())],
            )
            dot.replace(exp.Dot(this=exp.Identifier(this=service.name, quoted=True), expression=call))

    def lookup(self, node: exp.Expr, alias: exp.Identifier) -> Binding | None:
        """The entity ``alias`` names as seen from ``node``: innermost SELECT outwards."""
        select = node.find_ancestor(exp.Select)
        while select is not None:
            found = self.scopes.get(id(select), {}).get(_fold(alias))
            if found is not None:
                return found
            select = select.find_ancestor(exp.Select)
        return None

    def rewrite_params(self, root: exp.Query) -> None:
        for param in root.find_all(exp.Parameter):
            raise self.fail("use named parameters (:name)", param.sql(dialect=_DIALECT))
        for ph in list(root.find_all(exp.Placeholder)):
            if not ph.this:
                raise self.fail("use named parameters (:name)", "?")
            name = ph.name
            if name not in self.allowed:
                raise self.fail("unknown parameter", f":{name}")
            bracket = ph.parent
            if not (isinstance(bracket, exp.Bracket) and ph.arg_key == "this"):
                self.binds[name] = None
                continue
            attr = bracket.expressions[0] if len(bracket.expressions) == 1 else None
            written = self.written.get(name, f":{name}[]")
            if not (isinstance(attr, exp.Column) and not attr.table):
                raise self.fail("write :list[attribute] with one attribute name", written)
            in_list = bracket.parent
            if not (isinstance(in_list, exp.In) and in_list.expressions == [bracket]):
                raise self.fail(":list[attribute] must be the only element of an IN list", written)
            expansion = self.expansions.get((name, attr.name))
            if expansion is None:
                bind = f"{name}__{attr.name}"
                while bind in self.allowed or bind in {e.bind for e in self.expansions.values()}:
                    bind += "_"
                expansion = ListExpansion(param=name, attr=attr.name, bind=bind)
                self.expansions[(name, attr.name)] = expansion
            any_ = exp.Any(this=exp.Paren(this=exp.Placeholder(this=expansion.bind)))
            in_list.replace(exp.EQ(this=in_list.this, expression=any_))


def compile_query(
    text: str, *, catalog: Sequence[ServiceDescriptor], caller: str, params: Collection[str]
) -> QuerySpec:
    """Compile ``@Query`` text of service ``caller`` whose function has parameters ``params``.

    Raises ``LanguageError`` (with the offending ``token``) for anything that does not parse, is
    not a single read-only query, names an unknown or unexported entity, an unknown function or
    an unknown parameter.
    """
    c = _Compiler(text, catalog, caller, params)
    tokens = c.tokenize()
    sql, conditions = text, list[exp.Expr]()
    if tokens[0].token_type == TokenType.FROM:
        sql, conditions = c.from_first(tokens)
    root = c.parse(sql, tokens[0])
    if tokens[0].token_type == TokenType.FROM:
        select: exp.Expr = root
        while isinstance(select, exp.SetOperation):
            select = select.this
        source = select.args["from_"].this if isinstance(select, exp.Select) else None
        alias = source.args.get("alias") if source is not None else None
        first = alias.this if alias is not None else getattr(source, "this", None)
        if not isinstance(first, exp.Identifier):
            raise c.fail("the first FROM item needs a name or an alias", tokens[0].text)
        select.set("expressions", [exp.Column(this=exp.Star(), table=first.copy())])
        where = select.args.get("where")
        cond = exp.and_(*conditions, *([where.this] if where else [])) if conditions else None
        if cond is not None:
            select.set("where", exp.Where(this=cond))
    c.rewrite_tables(root)
    c.rewrite_functions(root)
    c.rewrite_params(root)
    out = _Generator(dialect=_DIALECT, comments=False).generate(root, copy=False)
    expected = set(c.binds) | {e.bind for e in c.expansions.values()}
    if set(sa_text(out).compile().params) != expected:
        raise LanguageError("the compiled SQL does not keep its bind parameters", text=text)
    used = set(c.binds) | {e.param for e in c.expansions.values()}
    order = [n for n in c.lexical if n in used] + sorted(used)
    return QuerySpec(
        text=text,
        sql=out,
        params=tuple(dict.fromkeys(order)),
        expansions=tuple(c.expansions.values()),
        entities=tuple(c.entities),
    )


def _attribute(item: Any, attr: str, param: str, text: str) -> Any:
    try:
        return item[attr] if isinstance(item, Mapping) else getattr(item, attr)
    except (KeyError, AttributeError) as err:
        raise LanguageError(
            f"an element of argument {param!r} has no {attr!r}", text=text, token=f":{param}"
        ) from err


def bind_values(spec: QuerySpec, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Bind values for ``spec.sql``: every referenced parameter, plus one list per expansion.

    A parameter used only as ``:list[attr]`` is passed as well; SQLAlchemy ignores it.
    """
    missing = [name for name in spec.params if name not in arguments]
    if missing:
        raise LanguageError(f"missing argument {missing[0]!r}", text=spec.text, token=f":{missing[0]}")
    values = {name: arguments[name] for name in spec.params}
    for e in spec.expansions:
        items = arguments[e.param]
        if items is None or isinstance(items, str | bytes | Mapping):
            raise LanguageError(
                f"argument {e.param!r} must be a sequence", text=spec.text, token=f":{e.param}"
            )
        values[e.bind] = [_attribute(item, e.attr, e.param, spec.text) for item in items]
    return values
