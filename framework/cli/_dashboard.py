"""``vmsdb dashboard APP``: the dashboard of an App's core, on 127.0.0.1 by default."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from framework._internal.loading import load_app
from framework._internal.serving import interrupted, serving

__all__ = ["mount"]

console = Console()


def dashboard(
    app: Annotated[str, typer.Argument(help="the services, as module:attribute (an App or a list)")],
    port: Annotated[int, typer.Option(help="port to serve the page on")] = 8600,
    host: Annotated[
        str, typer.Option(help="address to bind; anyone who can reach it can replay dead letters")
    ] = "127.0.0.1",
    actions: Annotated[
        bool, typer.Option(help="allow replaying and discarding dead letters from the page")
    ] = True,
) -> None:
    """Serve the dashboard: dataflow with live rates, correlations, dead letters, leases, recovery.

    It runs no handlers: start it next to the processes that do (``vmsdb run``, your API).
    """
    from framework.dashboard import create_dashboard

    async def serve() -> None:
        target = load_app(app)
        target.workers = False
        stop = interrupted()
        async with target, serving(create_dashboard(target, actions=actions), host, port):
            console.print(f"vmsdb dashboard: http://{host}:{port}/  (Ctrl-C to stop)")
            await stop.wait()

    asyncio.run(serve())


def mount(cli: typer.Typer) -> None:
    cli.command("dashboard")(dashboard)
