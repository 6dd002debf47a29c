"""How every ``vmsdb`` command reports an error of the framework or the core.

One line on stderr (``error: <message>``, never a traceback) and exit code 1, whether the error
escapes a subcommand or reaches :func:`framework.cli.main`: the messages already say what went
wrong and what to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from dbcore.errors import CoreError
from framework._internal.errors import FrameworkError

__all__ = ["REPORTED", "report", "run_async"]

T = TypeVar("T")

#: The errors reported as one line; anything else is a bug and keeps its traceback.
REPORTED = (FrameworkError, CoreError)


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
