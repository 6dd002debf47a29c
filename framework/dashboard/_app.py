"""The dashboard's FastAPI application: the page, its static files and its JSON API.

Read-only except ``POST /api/dead-letters/{id}/replay|discard``. Those need the header
``X-Vmsdb-Action: 1``: a browser sends a custom header cross-origin only after a CORS preflight,
which this application never grants, so another web page open in the operator's browser cannot
trigger them. They run on the App's own database connection, so they need the database role an
operator needs for ``vmsdb dead-letters``; ``actions=False`` turns them off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Header, HTTPException, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from framework.dashboard import _data

if TYPE_CHECKING:
    from framework._internal.app import App

__all__ = ["create_dashboard", "serving_dashboard"]

STATIC = Path(__file__).parent / "static"


class _Verdict:
    """The latest integrity verdict, computed on first request and when asked again."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.latest: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def get(self, *, again: bool = False) -> dict[str, Any]:
        async with self._lock:  # one check at a time: it reads the whole reference catalog
            if self.latest is None or again:
                self.latest = await _data.integrity(self.app)
            return self.latest


def create_dashboard(app: App, *, actions: bool = True) -> FastAPI:
    """The dashboard of ``app`` (started by its owner), as an ASGI application to serve or mount::

        api.mount("/vmsdb", create_dashboard(app))

    ``actions=False``: no dead-letter replay or discard, the page is read-only.
    """
    api = FastAPI(title="vmsdb dashboard", openapi_url=None, docs_url=None, redoc_url=None)
    verdict = _Verdict(app)
    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @api.get("/api/overview")
    async def overview() -> dict[str, Any]:
        return {"services": [d.name for d in app.descriptors], "actions": actions}

    @api.get("/api/graph")
    async def graph() -> dict[str, Any]:
        return await _data.graph(app)

    @api.get("/api/correlation")
    async def correlation(id: str = Query(min_length=1, max_length=200)) -> dict[str, Any]:
        return await _data.chain(app, id)

    @api.get("/api/dead-letters")
    async def dead_letters() -> list[dict[str, Any]]:
        return await _data.dead_letters(app)

    @api.post("/api/dead-letters/{letter_id}/{action}")
    async def settle(
        letter_id: int,
        action: Literal["replay", "discard"],
        x_vmsdb_action: str | None = Header(default=None),
    ) -> dict[str, Any]:
        if not actions:
            raise HTTPException(403, "this dashboard is read-only (started with actions off)")
        if x_vmsdb_action != "1":
            raise HTTPException(403, "dead-letter actions need the X-Vmsdb-Action: 1 header")
        done = await _data.settle_dead_letter(app, letter_id, action)
        if not done:
            raise HTTPException(409, f"dead letter {letter_id} is unknown or already settled")
        return {"id": letter_id, "action": action, "done": True}

    @api.get("/api/leases")
    async def leases() -> list[dict[str, Any]]:
        return await _data.leases(app)

    @api.get("/api/recovery")
    async def recovery() -> dict[str, Any]:
        return {**await _data.recovery(app), "integrity": await verdict.get()}

    @api.post("/api/integrity")
    async def check_again() -> dict[str, Any]:
        return await verdict.get(again=True)

    return api


@asynccontextmanager
async def serving_dashboard(
    app: App, port: int | None, host: str = "127.0.0.1", *, actions: bool = True
) -> AsyncIterator[str | None]:
    """Serve ``app``'s dashboard on ``host:port`` for the length of the block; yields its URL
    (``port=None``: serves nothing, yields ``None``)."""
    if port is None:
        yield None
        return
    from framework._internal.serving import serving

    async with serving(create_dashboard(app, actions=actions), host, port):
        yield f"http://{host}:{port}/"
