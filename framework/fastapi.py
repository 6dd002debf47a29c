"""FastAPI glue: run an :class:`~framework.App` in a FastAPI application.

```python
api = FastAPI()
attach(api, App([Stock, Cart]))            # started and stopped by the lifespan

CartService = Annotated[Cart, Depends(service(Cart))]

@api.patch("/cart/{customer_id}/add")
async def add(customer_id: str, item: Item, cart: CartService) -> dict:
    return await cart.add_item(customer_id, item)

@api.post("/cart/{customer_id}/checkout")
async def checkout(customer_id: str, app: CurrentApp) -> dict:
    mark = await publish_and_wait(app, CheckoutRequest(...), tid, CheckoutMark, timeout=30)
    ...
```

Framework errors become JSON answers ``{"error": "<class name>", "detail": "<message>"}`` in one
place: ``IsolationError`` 403, ``EntityNotFound`` 404 and ``EntityDeleted`` 410 (a reference to
an entity that is not there), ``LeaseError`` and :class:`Conflict` 409, ``RetriesExhausted`` 503,
``ServiceRecovering`` (a service restoring in consistency mode) 503, ``CoreUnavailable`` (the
database is down or restarting, and any driver or socket error that says so) 503 with
``Retry-After``, ``TimeoutError``
(``App.outcome``) 504, ``LanguageError``/``AnnotationError`` and any other
framework or core error 500. Request validation keeps FastAPI's 422 answer, which names the field.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, TypeVar

import asyncpg
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp

from dbcore.errors import CoreError, CoreUnavailable, IsolationError, LanguageError, LeaseError
from dbcore.references import EntityDeleted, EntityNotFound, ServiceRecovering
from dbcore.translate import unavailable
from framework._internal import telemetry
from framework._internal.app import App
from framework._internal.errors import AnnotationError, FrameworkError, RetriesExhausted
from framework._internal.events import Event
from framework._internal.scrape import metrics_route
from framework._internal.service import Service

__all__ = [
    "Conflict",
    "CurrentApp",
    "attach",
    "current_app",
    "error_body",
    "publish_and_wait",
    "run_lifespan",
    "service",
]

S = TypeVar("S", bound=Service)

log = logging.getLogger("vmsdb.http")

_STATE_KEY = "vmsdb_app"


class Conflict(FrameworkError):
    """The request cannot be carried out in the current state (HTTP 409).

    ``extra`` fields are added to the JSON body next to ``error`` and ``detail`` (which they
    cannot replace), e.g. the transaction id and status of a checkout that was not accepted.
    """

    def __init__(self, detail: str, /, **extra: Any) -> None:
        self.detail = detail
        self.extra = extra
        super().__init__(detail)


#: Most specific first: a handler is looked up along the exception's MRO, so the first entry
#: an error is an instance of decides its status.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (IsolationError, 403),
    (LeaseError, 409),
    (Conflict, 409),
    (EntityNotFound, 404),
    (EntityDeleted, 410),
    (RetriesExhausted, 503),
    (ServiceRecovering, 503),
    (CoreUnavailable, 503),
    (TimeoutError, 504),
    (LanguageError, 500),
    (AnnotationError, 500),
    (FrameworkError, 500),
    (CoreError, 500),
)


def error_body(exc: BaseException) -> dict[str, Any]:
    """The JSON body for ``exc``: ``{"error": <class name>, "detail": <message>, ...}``."""
    extra = exc.extra if isinstance(exc, Conflict) else {}
    return {**extra, "error": type(exc).__name__, "detail": str(exc)}


def _status_of(exc: BaseException) -> int:
    return next((status for kind, status in _STATUS if isinstance(exc, kind)), 500)


#: Seconds a client is told to wait (``Retry-After``) while the database is unavailable.
RETRY_AFTER = 2

#: Errors raised below the core's translation (a connection checkout, a driver's socket): an
#: unavailable database among them is answered 503 like ``CoreUnavailable``, the rest 500.
_DRIVER_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    DBAPIError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


async def _answer(request: Request, exc: Exception) -> JSONResponse:
    status = _status_of(exc)
    headers = {"Retry-After": str(RETRY_AFTER)} if isinstance(exc, CoreUnavailable) else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


async def _driver_error(request: Request, exc: Exception) -> JSONResponse:
    gone = unavailable(exc)
    if gone is not None:
        return await _answer(request, gone)
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(exc), status_code=500)


def _started(app: App) -> bool:
    try:
        app.core  # noqa: B018  # raises when the App is not started
    except FrameworkError:
        return False
    return True


def attach(api: FastAPI, app: App) -> FastAPI:
    """Run ``app`` inside ``api``: lifespan start/stop, ``api.state``, error answers, and the
    App's Prometheus metrics on ``GET /metrics``.

    An existing lifespan keeps running, inside the App's (so it can use the started App). An
    App that is already started when the lifespan begins is left running at its end: whoever
    started it stops it. Returns ``api``.
    """
    setattr(api.state, _STATE_KEY, app)
    inner = api.router.lifespan_context

    @asynccontextmanager
    async def lifespan(asgi: ASGIApp) -> AsyncIterator[Any]:
        owned = not _started(app)
        if owned:
            await app.start()
        try:
            async with inner(asgi) as state:
                yield state
        finally:
            if owned:
                await app.stop()

    api.router.lifespan_context = lifespan
    metrics_route(api, app)
    telemetry.instrument_fastapi(api)
    for kind, _status in _STATUS:
        api.add_exception_handler(kind, _answer)
    for driver in _DRIVER_ERRORS:
        api.add_exception_handler(driver, _driver_error)
    return api


def _app_of(request: Request) -> App:
    app = getattr(request.app.state, _STATE_KEY, None)
    if not isinstance(app, App):
        raise FrameworkError("no App is attached to this FastAPI application; call attach(api, app)")
    return app


# The dependencies are coroutines, though they never wait: FastAPI runs a plain ``def``
# dependency in a worker thread, one thread hop (a context switch each way and the GIL handed
# over) per dependency per request.
async def current_app(request: Request) -> App:
    """Dependency: the App attached to the request's FastAPI application."""
    return _app_of(request)


#: ``app: CurrentApp`` in a route's signature: the attached App.
CurrentApp = Annotated[App, Depends(current_app)]


_dependencies: dict[type[Service], Callable[[Request], Awaitable[Any]]] = {}


def service(cls: type[S]) -> Callable[[Request], Awaitable[S]]:
    """Dependency factory: ``Annotated[Cart, Depends(service(Cart))]`` gives the running instance.

    The same callable is returned for the same class, so FastAPI resolves it once per request.
    """
    found = _dependencies.get(cls)
    if found is None:

        async def dependency(request: Request) -> S:
            return _app_of(request).service(cls)

        dependency.__name__ = f"service_{cls.__name__}"
        dependency.__qualname__ = dependency.__name__
        _dependencies[cls] = found = dependency
    return found


async def publish_and_wait(
    app: App,
    event: Event,
    correlation_id: str,
    *outcomes: type[Event],
    timeout: float = 30.0,
    event_id: uuid.UUID | None = None,
) -> Event:
    """Publish ``event`` in ``correlation_id``'s chain and return the first of ``outcomes``.

    ``event_id`` makes a retried request publish nothing new (the log keeps one event per id);
    its outcome, if already known, is returned at once. Raises ``TimeoutError`` (HTTP 504 under
    :func:`attach`) when no outcome arrives within ``timeout`` seconds.
    """
    await app.publish(event, correlation_id=correlation_id, event_id=event_id)
    return await app.outcome(correlation_id, *outcomes, timeout=timeout)


def run_lifespan(api: FastAPI) -> AbstractAsyncContextManager[Any]:
    """``async with run_lifespan(api): ...`` runs ``api``'s lifespan by hand.

    For clients that do not send ASGI lifespan events, such as httpx's ``ASGITransport``.
    """
    return api.router.lifespan_context(api)
