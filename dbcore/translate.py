"""The one place where database errors become core errors.

asyncpg and SQLAlchemy report what Postgres refused as a driver error carrying a SQLSTATE. The
core reads that code here, and only here, and raises the matching ``CoreError`` with
``raise ... from err`` (so the driver's error stays visible as the cause):

- Postgres's own refusals, which need to know whose transaction ran: a permission error is an
  ``IsolationError`` naming the service and the table's owner, a write in a read-only
  transaction a ``ReadOnlyViolation``, a serialization failure or deadlock a
  ``TransactionConflict``;
- the codes the core's own SQL raises (references and recovery, ``reference_catalog.py``),
  which mean the same whoever ran the statement.

An error this module does not know is left alone: callers re-raise it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import sqlglot
from sqlalchemy.exc import DBAPIError
from sqlglot import exp

from dbcore.catalog import SERVICE_ROLE_PREFIX
from dbcore.errors import (
    CoreError,
    CoreUnavailable,
    EntityDeleted,
    EntityNotFound,
    IsolationError,
    ReadOnlyViolation,
    ServiceRecovering,
    TransactionConflict,
    TruncateRefused,
)
from dbcore.reference_catalog import (
    SQLSTATE_DELETED,
    SQLSTATE_NOT_FOUND,
    SQLSTATE_RECOVERING,
    SQLSTATE_TRUNCATE,
)

__all__ = [
    "conflict_kind",
    "core_error",
    "is_retryable",
    "sqlstate_of",
    "translate_error",
    "translated",
    "unavailable",
]

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
INSUFFICIENT_PRIVILEGE = "42501"
READ_ONLY_TRANSACTION = "25006"

#: What a retryable SQLSTATE is called in messages and logs.
_CONFLICTS: Mapping[str, str] = {
    SERIALIZATION_FAILURE: "serialization failure",
    DEADLOCK_DETECTED: "deadlock",
}

# The core's own codes: the same refusal whoever ran the statement.
_CORE_CODES: Mapping[str, type[CoreError]] = {
    SQLSTATE_NOT_FOUND: EntityNotFound,
    SQLSTATE_DELETED: EntityDeleted,
    SQLSTATE_RECOVERING: ServiceRecovering,
    SQLSTATE_TRUNCATE: TruncateRefused,
}

# Postgres: "permission denied for table stock_items" / "... for schema stock" / "... for view v".
_DENIED = re.compile(r"permission denied for (table|schema|view|sequence|relation|function) (\S+)")
# "permission denied to set role "vms_stock"" (SET ROLE, set_config('role', ...)).
_ROLE_DENIED = re.compile(r'permission denied to set role "([^"]+)"')
_EVENTS_POLICY = 'row-level security policy for table "events"'
_WRITE_WORDS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "MERGE", "CREATE", "ALTER", "DROP")


def sqlstate_of(err: BaseException) -> str | None:
    """The SQLSTATE of a database error, whichever layer (SQLAlchemy, asyncpg) raised it."""
    orig = err.orig if isinstance(err, DBAPIError) else err
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_retryable(err: BaseException) -> bool:
    """A serialization failure or a deadlock: running the transaction again may succeed."""
    return sqlstate_of(err) in _CONFLICTS


def conflict_kind(err: BaseException) -> str:
    """``"serialization failure"``, ``"deadlock"``, or the SQLSTATE (``"?"`` without one)."""
    state = sqlstate_of(err)
    return _CONFLICTS.get(state or "", state or "?")


def _message(err: BaseException) -> str:
    return str(err.orig if isinstance(err, DBAPIError) else err)


# The database is away: a connection exception (class 08), an administrator's or a crash's
# shutdown (57P01, 57P02), a server that cannot accept connections now (57P03).
_UNAVAILABLE_CLASS = "08"
_UNAVAILABLE_CODES = frozenset({"57P01", "57P02", "57P03"})
# What the drivers raise without a SQLSTATE when the socket is gone.
_GONE = ("connection is closed", "connection was closed", "connection was lost")


def _from_a_driver(err: BaseException) -> bool:
    return type(err).__module__.startswith(("asyncpg", "sqlalchemy"))


def unavailable(err: BaseException) -> CoreUnavailable | None:
    """``CoreUnavailable`` when ``err`` says the database cannot be reached now, else ``None``.

    Connection refused or reset, a socket that is gone, an administrator's shutdown, a server
    starting up or shutting down: whichever layer (OS, asyncpg, SQLAlchemy) reported it.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:  # SQLAlchemy wraps, asyncpg chains
        seen.add(id(cause))
        if isinstance(cause, CoreUnavailable):
            return cause
        state = sqlstate_of(cause)
        text_of = str(cause).lower()
        if (
            (state is not None and (state.startswith(_UNAVAILABLE_CLASS) or state in _UNAVAILABLE_CODES))
            or isinstance(cause, ConnectionError)  # refused, reset, aborted
            # a Unix socket that is gone (a file the code opened would carry its name)
            or (isinstance(cause, FileNotFoundError) and cause.filename is None)
            or type(cause).__name__ in ("ConnectionDoesNotExistError", "CannotConnectNowError")
            or (_from_a_driver(cause) and any(words in text_of for words in _GONE))
        ):
            return CoreUnavailable(
                f"the database is unavailable ({type(cause).__name__}: {str(cause) or 'no detail'}); "
                "try again in a moment"
            )
        nxt = cause.orig if isinstance(cause, DBAPIError) else None
        cause = nxt if nxt is not None else (cause.__cause__ or cause.__context__)
    return None


def core_error(err: BaseException) -> CoreError | None:
    """The core error for a code the core's own SQL raised (or ``CoreUnavailable``), or ``None``."""
    gone = unavailable(err)
    if gone is not None:
        return gone
    kind = _CORE_CODES.get(sqlstate_of(err) or "")
    if kind is None:
        return None
    # asyncpg's text is "<class 'asyncpg...'>: message"; the core's message is the last part.
    return kind(_message(err).split(": ", 1)[-1].strip())


def translate_error(
    err: BaseException,
    *,
    service: str,
    table_owners: Mapping[str, str],
    statement: str | None = None,
) -> CoreError | None:
    """Map a database error raised in ``service``'s transaction to a core error, or ``None``.

    ``table_owners`` maps both ``schema.table`` and bare ``table`` names to their owning service,
    so the error can name the service whose boundary was hit.
    """
    state = sqlstate_of(err)
    if state == INSUFFICIENT_PRIVILEGE:
        return _isolation_error(err, service, table_owners, statement)
    if state == READ_ONLY_TRANSACTION:
        return ReadOnlyViolation(
            f"service {service!r} tried to write in a read-only (RO) transaction; "
            'declare the function @Transactional(type="RW") to let it write'
        )
    kind = _CONFLICTS.get(state or "")
    if kind is not None:
        return TransactionConflict(f"transaction of service {service!r} conflicted: {err}", kind=kind)
    return core_error(err)


@contextmanager
def translated(service: str | None = None, table_owners: Mapping[str, str] | None = None) -> Iterator[None]:
    """Raise a database error escaping the block as its core error (``from`` the original).

    ``service``: whose transaction the block runs; without it only the core's own codes are
    translated (a permission error then surfaces where the service is known). Errors that map
    to nothing pass through unchanged.
    """
    try:
        yield
    except CoreError:
        raise
    except Exception as err:
        if service is None:
            translated_error = core_error(err)
        else:
            translated_error = translate_error(err, service=service, table_owners=table_owners or {})
        if translated_error is None:
            raise
        raise translated_error from err


def _isolation_error(
    err: BaseException, service: str, table_owners: Mapping[str, str], statement: str | None
) -> IsolationError:
    message = _message(err).split(": ", 1)[-1].strip()
    role = _ROLE_DENIED.search(message)
    if role is not None:  # SET ROLE / set_config('role', ...) to another role
        target = role.group(1)
        owner = target.removeprefix(SERVICE_ROLE_PREFIX) if target.startswith(SERVICE_ROLE_PREFIX) else None
        return IsolationError(service, owner, f"role {target}", "become", refusal=message)
    if _EVENTS_POLICY in message:  # vms.events' row-level security: an undeclared type
        return IsolationError(
            service,
            None,
            "vms.events",
            "send",
            refusal=f"{message} (a service inserts only the event types it declared with "
            "@Outbound, in its own name)",
        )
    match = _DENIED.search(message)
    if match is None:  # ALTER ROLE, COPY ... PROGRAM, a superuser's function: nothing of a table
        return IsolationError(service, None, (statement or "").strip()[:200], "run", refusal=message)
    table = match.group(2) if match else "(unknown object)"
    sql = statement or getattr(err, "statement", None) or ""
    owner = table_owners.get(table)
    if owner is not None and match and match.group(1) != "schema":
        table = f"{owner}.{table}"  # a service's schema is named after it
    if owner is None and match and match.group(1) in ("table", "view", "relation"):
        # Postgres names the table without its schema; the statement says which one it was.
        table, owner = _qualified_in_statement(sql, table, service, table_owners)
    if owner is None and match and match.group(1) == "schema":
        owner = table if table in table_owners.values() else None
    action = "write" if sql.lstrip().upper().startswith(_WRITE_WORDS) else "access"
    return IsolationError(service, owner, table, action)


def _qualified_in_statement(
    sql: str, table: str, service: str, table_owners: Mapping[str, str]
) -> tuple[str, str | None]:
    """Find ``schema.table`` for a bare table name among the statement's table references."""
    try:
        tables = list(sqlglot.parse_one(sql, read="postgres").find_all(exp.Table))
    except sqlglot.errors.SqlglotError:
        return table, None
    for ref in tables:
        qualified = f"{ref.db}.{ref.name}"
        owner = table_owners.get(qualified)
        if ref.name == table and owner is not None and owner != service:
            return qualified, owner
    return table, None
