"""Building the eShop: the App of the eight services, and the FastAPI application around it.

```
uvicorn --factory vmsdb_eshop.app:create_api      # or: vmsdb eshop serve
vmsdb services vmsdb_eshop.app:services           # descriptors and event dataflow
```
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from framework import App
from framework.fastapi import attach, error_body
from vmsdb_eshop.config import settings
from vmsdb_eshop.payments import payment_processor
from vmsdb_eshop.provider import PaymentProvider, SimulatedProvider
from vmsdb_eshop.routes import ROUTERS, NotFound, ops
from vmsdb_eshop.services import SERVICES

__all__ = ["create_api", "create_app", "default_provider", "services"]

#: The service classes, for ``vmsdb services vmsdb_eshop.app:services``.
services = SERVICES

_DESCRIPTION = """
The eShop sample of vmsdb: the eight services of the *Online Marketplace* benchmark
(cart, customer, order, payment, product, seller, shipment, stock) as virtual microservices on
one Postgres core, behind the benchmark driver's HTTP API.

Checkout (`POST /cart/{customerId}/checkout`), price update (`PATCH /product`) and product
replacement (`PUT /product`) answer when their event chain has an outcome, with its transaction
mark `{tid, type, actorId, status, source}`: 200 on SUCCESS, 409 when not accepted.

Input is checked against the columns it ends in (422 naming the field) and unknown customers
and products are 404 before anything is published. A transaction id (`instanceId`, a
replacement's `version`) names one request: a repeat gets the first answer and publishes
nothing, another request under it (another customer's checkout, say) is 409.
"""


def create_app(**options: Any) -> App:
    """The App of all eight services; ``options`` go to :class:`~framework.App`.

    The schemas come from the services' migrations (``services/migrations/<service>/``),
    brought to head at start-up unless ``options`` say otherwise (``migrate=False``: refuse to
    start off head, as in production after ``vmsdb migrate vmsdb_eshop.services:SERVICES``).
    """
    if not options.get("create_tables"):
        options.setdefault("migrate", True)
    return App(SERVICES, **options)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=404)


async def _invalid(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 answer, as ASCII JSON: it echoes the input, which may hold a lone surrogate
    that UTF-8 cannot encode (the default answer would fail with a 500)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    body = json.dumps({"detail": jsonable_encoder(errors)}, ensure_ascii=True)
    return Response(body, status_code=422, media_type="application/json")


def default_provider() -> SimulatedProvider:
    """The simulated payment provider, as ``ESHOP_PAYMENT_*`` configures it."""
    config = settings()
    return SimulatedProvider(
        latency=config.payment_latency_ms / 1000, failure_rate=config.payment_failure_rate
    )


def create_api(
    app: App | None = None, *, only: Iterable[str] | None = None, provider: PaymentProvider | None = None
) -> FastAPI:
    """The FastAPI application; its lifespan starts and stops ``app`` (default: a new one).

    ``only`` restricts the routes to those of the named services (``serve --service cart``);
    ``/reset`` and ``/cleanup`` are always there. A process that runs the payment service's
    handlers also runs a payment processor against ``provider`` (default: ``default_provider``).
    """
    chosen = set(ROUTERS) if only is None else set(only)
    unknown = chosen - set(ROUTERS) - {s.service_name() for s in SERVICES}
    if unknown:
        raise ValueError(f"unknown service(s): {', '.join(sorted(unknown))}; choose from {sorted(ROUTERS)}")
    # A process serving some services' routes runs only those services' event handlers.
    workers = True if only is None else chosen & {s.service_name() for s in SERVICES}
    charges = workers is True or "payment" in workers
    running = app if app is not None else create_app(workers=workers)

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        if not charges:
            yield
            return
        async with payment_processor(running, provider or default_provider()):
            yield

    api = FastAPI(title="vmsdb eShop", version="1.0", description=_DESCRIPTION, lifespan=lifespan)
    attach(api, running)
    for name, router in ROUTERS.items():
        if name in chosen:
            api.include_router(router)
    api.include_router(ops)
    api.add_exception_handler(NotFound, _not_found)
    api.add_exception_handler(RequestValidationError, _invalid)
    return api
