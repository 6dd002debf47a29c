"""How every ``vmsdb`` command reports an error of the framework or the core.

One line on stderr (``error: <message>``, never a traceback) and exit code 1, whether the error
escapes a subcommand or reaches :func:`framework.cli.main`: the messages already say what went
wrong and what to do. Two database states that are not bugs are reported the same way, with what
to do: a database that cannot be reached, and one without the core's catalog (never migrated).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from dbcore.errors import CoreError
from dbcore.translate import sqlstate_of, unavailable
from framework._internal.errors import FrameworkError

__all__ = ["REPORTED", "NoCore", "explained", "report", "run_async"]

T = TypeVar("T")

#: The errors reported as one line; anything else is a bug and keeps its traceback.
REPORTED = (FrameworkError, CoreError)


class NoCore(FrameworkError):
    """The database has no vmsdb core (or not all of it): it was never migrated."""


# undefined_table, undefined_function, invalid_schema_name: the catalog (schema vms) is missing.
_NO_CATALOG = ("42P01", "42883", "3F000")


def explained(err: BaseException) -> FrameworkError | CoreError | None:
    """A one-line error for a database error that is not a bug, or ``None``."""
    gone = unavailable(err)
    if gone is not None:
        return type(gone)(
            f"{gone}; start the database, or set VMSDB_DATABASE_URL to a server that runs"
        )
    if sqlstate_of(err) in _NO_CATALOG:
        first = str(getattr(err, "orig", None) or err).splitlines()[0].split(": ", 1)[-1]
        return NoCore(
            f"the database has no vmsdb core ({first}): run `vmsdb migrate up APP` to install "
            "the core and the services' schemas first"
        )
    return None


def report(err: BaseException) -> None:
    """Print ``err`` as one line on stderr (soft wrap: a terminal may fold it, rich does not)."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)


def run_async(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()`` to its end; a framework or core error is reported, and the command exits 1."""

    async def main() -> T:
        return await work()

    try:
        return asyncio.run(main())
    except REPORTED as err:
        report(err)
        raise typer.Exit(1) from err
    except Exception as err:
        known = explained(err)
        if known is None:
            raise  # a bug: keep its traceback
        report(known)
        raise typer.Exit(1) from err
