"""Serving an ASGI application in the running event loop, next to an App (metrics, dashboard)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from framework._internal.app import App

__all__ = ["interrupted", "serving", "serving_metrics"]


class _Server(uvicorn.Server):
    """A uvicorn server that leaves the process's signal handlers alone: its owner stops it."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def serving(asgi: Any, host: str, port: int) -> AsyncIterator[uvicorn.Server]:
    """Serve ``asgi`` on ``host:port`` for the length of the block; raises ``OSError`` if the
    port cannot be bound."""
    server = _Server(uvicorn.Config(asgi, host=host, port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(), name=f"vmsdb-http-{port}")
    while not server.started:
        if task.done():  # bind failed: uvicorn logs it and exits
            task.result()
            raise OSError(f"could not serve on {host}:{port}")
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def serving_metrics(app: App, port: int | None, host: str = "127.0.0.1") -> AsyncIterator[None]:
    """``app``'s ``/metrics`` on ``host:port`` for the length of the block (no port: nothing)."""
    if port is None:
        yield
        return
    from framework._internal.scrape import metrics_api

    async with serving(metrics_api(app), host, port):
        yield


def interrupted() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (for commands that serve until stopped)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
