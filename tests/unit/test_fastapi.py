"""FastAPI glue: the lifespan runs the App, routes get services, framework errors become HTTP answers.

The errors are provoked for real (a write into another service's schema, an expired lease, a
chain that never answers) on the embedded Postgres of the ``vmsdb_app_factory`` fixture.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.dependencies import utils as fastapi_dependencies
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column

from framework import (
    App,
    EntityDeleted,
    EntityNotFound,
    Event,
    FrameworkError,
    Inbound,
    Lease,
    LeaseGrant,
    Outbound,
    Query,
    RetriesExhausted,
    Service,
    ServiceRecovering,
    Transactional,
    consume_lease,
    send,
    session,
)
from framework.fastapi import Conflict, CurrentApp, attach, publish_and_wait, run_lifespan, service
from framework.testing import advance_clock


class Ping(Event, key="key"):
    key: str


class Pong(Event, key="key"):
    key: str


class Depot(Service, name="fa_depot"):
    @Lease("FROM Bin b WHERE b.sku = :sku FOR UPDATE DECREMENT b.qty BY :qty WITH PERIOD :period")
    async def hold(self, sku: str, qty: int, period: timedelta) -> LeaseGrant | None: ...

    @Query("SELECT b.sku, b.qty FROM Bin b WHERE b.sku IN (:wanted[sku])")
    async def find(self, wanted: Any) -> list[dict[str, Any]]: ...

    @Transactional
    async def put(self, sku: str, qty: int) -> None:
        session().add(Bin(sku=sku, qty=qty))


@Depot.export
class Bin(Depot.Model):
    __tablename__ = "bins"
    sku: Mapped[str] = mapped_column(primary_key=True)
    qty: Mapped[int]


class Shop(Service, name="fa_shop"):
    depot: Depot

    @Transactional
    async def tamper(self) -> None:
        await session().execute(text("UPDATE fa_depot.bins SET qty = 0"))

    @Transactional
    async def buy(self, lease: LeaseGrant) -> None:
        await consume_lease(lease)

    @Inbound(Ping)
    @Outbound(Pong)
    async def on_ping(self, ping: Ping) -> None:
        if ping.key != "silent":
            send(Pong(key=ping.key))


class Item(BaseModel):
    sku: str
    qty: int


SERVICES: list[type[Service]] = [Depot, Shop]
DepotApi = Annotated[Depot, Depends(service(Depot))]
ShopApi = Annotated[Shop, Depends(service(Shop))]
Client = Callable[[FastAPI], AbstractAsyncContextManager[httpx.AsyncClient]]


def routes(api: FastAPI) -> FastAPI:
    """Routes that reach each error through real framework calls."""

    @api.post("/items")
    async def add(item: Item, depot: DepotApi) -> dict[str, Any]:
        await depot.put(item.sku, item.qty)
        return {"depot": id(depot)}

    @api.get("/whoami")
    async def whoami(app: CurrentApp, shop: ShopApi) -> dict[str, int]:
        return {"shop": id(shop), "same": int(shop is app.service(Shop))}

    @api.post("/tamper")
    async def tamper(shop: ShopApi) -> None:
        await shop.tamper()

    @api.post("/buy-late")
    async def buy_late(app: CurrentApp, shop: ShopApi) -> None:
        grant = await app.service(Depot).hold("s1", 1, timedelta(minutes=1))
        assert grant is not None
        await advance_clock(app, timedelta(minutes=2))
        await shop.buy(grant)

    @api.post("/conflict")
    async def conflict() -> None:
        raise Conflict("not accepted", tid="t9", status="NOT_ACCEPTED")

    @api.post("/ping/{key}")
    async def ping(key: str, app: CurrentApp) -> dict[str, str]:
        pong = await publish_and_wait(app, Ping(key=key), f"c-{key}", Pong, timeout=0.5)
        assert isinstance(pong, Pong)
        return {"pong": pong.key}

    @api.get("/bad-query")
    async def bad_query(depot: DepotApi) -> Any:
        return await depot.find("not a list")

    @api.get("/bad-service")
    async def bad_service() -> None:
        App([Item])  # type: ignore[list-item]

    @api.get("/exhausted")
    async def exhausted() -> None:
        raise RetriesExhausted("fa_shop.buy", 10, RuntimeError("serialization failure"))

    @api.get("/gone")
    async def gone() -> None:
        raise EntityDeleted("entity vms://fa_depot/items/x was deleted")

    @api.get("/unknown")
    async def unknown() -> None:
        raise EntityNotFound("no referenceable entity vms://fa_depot/items/y")

    @api.get("/recovering")
    async def recovering() -> None:
        raise ServiceRecovering("service 'fa_depot' is recovering in consistency mode")

    return api


@pytest.fixture
def client() -> Client:
    @asynccontextmanager
    async def open_client(api: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http

    return open_client


@pytest.fixture
async def api(vmsdb_app_factory: Any) -> AsyncIterator[FastAPI]:
    async with vmsdb_app_factory(SERVICES) as app:
        api = routes(attach(FastAPI(), app))
        async with run_lifespan(api):
            yield api


async def test_lifespan_starts_the_app_and_runs_the_existing_lifespan_inside(
    vmsdb_database: str, client: Client
) -> None:
    seen: list[str] = []

    @asynccontextmanager
    async def own(api: FastAPI) -> AsyncIterator[None]:
        seen.append(f"enter, started={app.service(Depot) is not None and app.core is not None}")
        yield
        seen.append("exit")

    app = App(SERVICES, database_url=vmsdb_database, create_tables=True)
    api = routes(attach(FastAPI(lifespan=own), app))
    assert api.state.vmsdb_app is app
    async with run_lifespan(api), client(api) as http:
        assert (await http.post("/items", json={"sku": "a", "qty": 3})).status_code == 200
    assert seen == ["enter, started=True", "exit"]
    with pytest.raises(FrameworkError, match="not started"):
        app.core  # noqa: B018


async def test_lifespan_leaves_an_app_it_did_not_start_running(vmsdb_app_factory: Any) -> None:
    async with vmsdb_app_factory(SERVICES) as app:
        async with run_lifespan(attach(FastAPI(), app)):
            pass
        await app.service(Depot).put("still", 1)  # the App still runs


async def test_service_dependency_gives_the_running_instance(api: FastAPI, client: Client) -> None:
    assert service(Shop) is service(Shop)
    async with client(api) as http:
        body = (await http.get("/whoami")).json()
    assert body["same"] == 1


async def test_no_dependency_runs_in_a_worker_thread(
    api: FastAPI, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain ``def`` dependency costs a thread hop per request: the framework's are coroutines."""
    hops: list[str] = []
    real = fastapi_dependencies.run_in_threadpool

    async def counted(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(call, "__name__", repr(call)))
        return await real(call, *args, **kwargs)

    monkeypatch.setattr(fastapi_dependencies, "run_in_threadpool", counted)
    async with client(api) as http:
        assert (await http.get("/whoami")).json()["same"] == 1
        assert (await http.post("/items", json={"sku": "t", "qty": 1})).status_code == 200

    assert hops == []

    def sync_app(request: Request) -> str:  # what the dependencies were: the check sees it
        return request.url.path

    probe = FastAPI()

    @probe.get("/sync-dependency")
    async def uses_sync(path: str = Depends(sync_app)) -> str:  # local: no Annotated (postponed)
        return path

    async with client(probe) as http:
        assert (await http.get("/sync-dependency")).json() == "/sync-dependency"
    assert hops == ["sync_app"]


async def test_isolation_error_is_403_naming_both_services(api: FastAPI, client: Client) -> None:
    async with client(api) as http:
        response = await http.post("/tamper")
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "IsolationError"
    assert "'fa_shop'" in body["detail"] and "'fa_depot'" in body["detail"]


async def test_lease_error_is_409(api: FastAPI, client: Client) -> None:
    async with client(api) as http:
        assert (await http.post("/items", json={"sku": "s1", "qty": 5})).status_code == 200
        response = await http.post("/buy-late")
    assert response.status_code == 409
    assert response.json()["error"] == "LeaseExpired"
    assert "expired" in response.json()["detail"]


async def test_conflict_is_409_with_its_fields(api: FastAPI, client: Client) -> None:
    async with client(api) as http:
        response = await http.post("/conflict")
    assert response.status_code == 409
    assert response.json() == {
        "error": "Conflict",
        "detail": "not accepted",
        "tid": "t9",
        "status": "NOT_ACCEPTED",
    }


async def test_publish_and_wait_returns_the_outcome_and_times_out_as_504(
    api: FastAPI, client: Client
) -> None:
    async with client(api) as http:
        answered = await http.post("/ping/hello")
        silent = await http.post("/ping/silent")
    assert answered.status_code == 200 and answered.json() == {"pong": "hello"}
    assert silent.status_code == 504
    assert silent.json()["error"] == "TimeoutError" and "Pong" in silent.json()["detail"]


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/bad-query", 500, "LanguageError"),
        ("/bad-service", 500, "AnnotationError"),
        ("/exhausted", 503, "RetriesExhausted"),
        ("/gone", 410, "EntityDeleted"),
        ("/unknown", 404, "EntityNotFound"),
        ("/recovering", 503, "ServiceRecovering"),
    ],
)
async def test_other_framework_errors(
    api: FastAPI, client: Client, path: str, status: int, error: str
) -> None:
    async with client(api) as http:
        response = await http.get(path)
    assert response.status_code == status
    assert response.json()["error"] == error and response.json()["detail"]


async def test_bad_body_is_422_naming_the_field(api: FastAPI, client: Client) -> None:
    async with client(api) as http:
        response = await http.post("/items", json={"sku": "a", "qty": "many"})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "qty"]]


async def test_current_app_without_attach_is_a_500_saying_so(client: Client) -> None:
    api = FastAPI()
    attach(api, App(SERVICES))  # registers the error answers ...
    del api.state.vmsdb_app  # ... but no App to hand out

    @api.get("/who")
    async def who(app: CurrentApp) -> None: ...

    async with client(api) as http:
        response = await http.get("/who")
    assert response.status_code == 500
    assert "attach(api, app)" in response.json()["detail"]
