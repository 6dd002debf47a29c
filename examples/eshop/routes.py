"""The eShop's HTTP API: the Online Marketplace driver's routes, one router per service.

Checkout, price update and product update answer when their event chain's outcome is known,
with the chain's transaction mark (``{tid, type, actorId, status, source}``); a chain that
ends NOT_ACCEPTED answers 409 with the same fields. Everything else answers synchronously.

Nothing is published for a request the edge can refuse: bodies and path parameters are checked
against the columns they end in (422 naming the field), unknown customers and products are 404,
a transaction id that names another request, or a stale version, is 409. A repeated checkout,
price update or replacement (same id, same request) publishes nothing and gets the first
one's answer. Every route documents the statuses it can answer.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, status
from pydantic import BaseModel, ConfigDict

from framework import App, Event, correlate
from framework.fastapi import Conflict, CurrentApp, service
from vmsdb_eshop.config import settings
from vmsdb_eshop.events import (
    CheckoutMark,
    PriceUpdateMark,
    ProductUpdateMark,
    TransactionMark,
)
from vmsdb_eshop.schemas import (
    INT32_MAX,
    CartItemBody,
    CheckoutBody,
    CustomerCheckout,
    CustomerRow,
    MarkStatus,
    PriceUpdateBody,
    ProductData,
    ProductReplacement,
    SellerRow,
    StockRow,
)
from vmsdb_eshop.services import Cart, Customer, Order, Payment, Product, Seller, Shipment, Stock
from vmsdb_eshop.services.cart import UnknownEntity
from vmsdb_eshop.services.product import Change

__all__ = ["ROUTERS", "NotFound", "cleanup", "ops"]

Row = dict[str, Any]
T = TypeVar("T")

#: What a route gets to call each service (the running instance, from the attached App).
CartApi = Annotated[Cart, Depends(service(Cart))]
CustomerApi = Annotated[Customer, Depends(service(Customer))]
OrderApi = Annotated[Order, Depends(service(Order))]
ProductApi = Annotated[Product, Depends(service(Product))]
SellerApi = Annotated[Seller, Depends(service(Seller))]
ShipmentApi = Annotated[Shipment, Depends(service(Shipment))]
StockApi = Annotated[Stock, Depends(service(Stock))]


#: A path's id (customer, seller, product): an int4 column's non-negative range.
IdPath = Annotated[int, Path(ge=0, le=INT32_MAX)]
#: A path's transaction id: at most the 200 characters of the tid columns, no NUL.
TidPath = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]


class NotFound(LookupError):
    """No such entity (HTTP 404)."""


class ErrorAnswer(BaseModel):
    """An error answer: the error's class and what went wrong (a 409 of a chain adds its mark)."""

    model_config = ConfigDict(extra="allow")
    error: str
    detail: str


class UnreadableBody(BaseModel):
    """FastAPI's answer to a body that is not JSON text (undecodable bytes)."""

    detail: str


def _answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    answers: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorAnswer, "description": _MEANING[code]} for code in statuses if code != 400
    }
    if 400 in statuses:
        answers[400] = {"model": UnreadableBody, "description": "The body is not JSON text"}
    return answers


_MEANING = {
    404: "No such customer, product or entity",
    409: "Not accepted: the chain's mark, a used transaction id, a stale version, a lease",
    503: "The database is unavailable or a service is recovering; retry later",
    504: "The chain's outcome did not arrive in time (it may still complete; retry the same id)",
}
#: Chains answer when their outcome is known: unknown entities, refusals, time-outs.
_CHAIN = _answers(400, 404, 409, 504)


def _found(value: T | None, what: str) -> T:
    if value is None:
        raise NotFound(f"{what} does not exist")
    return value


def _concluded(mark: Event) -> Row:
    """The mark as the answer: 200 on SUCCESS, otherwise a 409 carrying the same fields."""
    assert isinstance(mark, TransactionMark)
    body = mark.model_dump(mode="json", by_alias=True)
    if mark.status is not MarkStatus.SUCCESS:
        why = f": {mark.reason}" if mark.reason else ""
        raise Conflict(f"{mark.type} {mark.tid} ended {mark.status} at {mark.source}{why}", **body)
    return body


def _tid(given: str | None) -> str:
    return given or uuid.uuid4().hex


def _refused(change: Change, tid: str, what: str) -> None:
    """A price update's or replacement's refusal as 404/409 (nothing was published)."""
    if change is Change.UNKNOWN:
        raise NotFound(f"{what} does not exist")
    if change is Change.TAKEN:
        raise Conflict(f"transaction id {tid!r} was used by another request", tid=tid)


_UNAVAILABLE = _answers(503)
cart = APIRouter(prefix="/cart", tags=["cart"], responses=_UNAVAILABLE)
customer = APIRouter(prefix="/customer", tags=["customer"], responses=_UNAVAILABLE)
order = APIRouter(prefix="/order", tags=["order"], responses=_UNAVAILABLE)
product = APIRouter(prefix="/product", tags=["product"], responses=_UNAVAILABLE)
seller = APIRouter(prefix="/seller", tags=["seller"], responses=_UNAVAILABLE)
shipment = APIRouter(prefix="/shipment", tags=["shipment"], responses=_UNAVAILABLE)
stock = APIRouter(prefix="/stock", tags=["stock"], responses=_UNAVAILABLE)
ops = APIRouter(tags=["operations"], responses=_UNAVAILABLE)

# -- ingestion ---------------------------------------------------------------------------------


@seller.post("", status_code=status.HTTP_201_CREATED, responses=_answers(400))
async def ingest_seller(row: SellerRow, svc: SellerApi) -> Row:
    await svc.ingest([row])
    return row.model_dump()


@customer.post("", status_code=status.HTTP_201_CREATED, responses=_answers(400))
async def ingest_customer(row: CustomerRow, svc: CustomerApi) -> Row:
    await svc.ingest([row])
    return row.model_dump()


@product.post("", status_code=status.HTTP_201_CREATED, responses=_answers(400))
async def ingest_product(row: ProductData, svc: ProductApi) -> Row:
    await svc.ingest([row])
    return row.model_dump()


@stock.post("", status_code=status.HTTP_201_CREATED, responses=_answers(400))
async def ingest_stock(row: StockRow, svc: StockApi) -> Row:
    await svc.ingest([row])
    return row.model_dump()


# -- customer session --------------------------------------------------------------------------


@cart.patch("/{customer_id}/add", responses=_answers(400, 404, 409))
async def add_to_cart(customer_id: IdPath, item: CartItemBody, svc: CartApi) -> Row:
    """Add an item; its quantity is held by a stock lease when there is enough (``reserved``).

    404 for an unknown customer or product.
    """
    try:
        result: Row = await svc.add_item(customer_id, item)
    except UnknownEntity as err:
        raise NotFound(str(err)) from None
    return result


@cart.post("/{customer_id}/checkout", responses=_CHAIN)
async def checkout(
    customer_id: IdPath, body: CheckoutBody, app: CurrentApp, svc: CartApi, customers: CustomerApi
) -> Row:
    """Check the cart out; answers when the order is shipped (200) or not accepted (409).

    404 for an unknown customer; 409 for an ``instanceId`` another customer's checkout used. A
    repeat of the same customer's ``instanceId`` publishes nothing and gets the first answer.
    """
    _found(await customers.get(customer_id), f"customer {customer_id}")
    tid = _tid(body.instance_id)
    fields = {**body.model_dump(), "customer_id": customer_id, "instance_id": tid}
    # One call binds the id and sends the request (to the cart's own handler, in this App).
    with correlate(tid):
        owner = await svc.start_checkout(customer_id, tid, CustomerCheckout(**fields))
    # The id names one customer's checkout: its outcome is looked up by the id, so another
    # customer must never wait on it (they would read the first customer's mark).
    if owner != customer_id:
        raise Conflict(f"checkout id {tid!r} belongs to another customer's checkout", tid=tid)
    mark = await app.outcome(tid, CheckoutMark, timeout=settings().outcome_timeout)
    return _concluded(mark)


@cart.patch("/{customer_id}/seal", responses=_answers(404))
async def seal_cart(customer_id: IdPath, svc: CartApi, customers: CustomerApi) -> Row:
    """Empty the cart and release its stock leases."""
    _found(await customers.get(customer_id), f"customer {customer_id}")
    return {"customer_id": customer_id, "dropped": await svc.seal(customer_id)}


@cart.get("/{customer_id}/history/{tid}")
async def cart_history(customer_id: IdPath, tid: TidPath, svc: CartApi) -> list[Row]:
    """The items transaction ``tid`` checked out, at the prices charged."""
    result: list[Row] = await svc.history(customer_id, tid)
    return result


@cart.get("/{customer_id}", responses=_answers(404))
async def get_cart(customer_id: IdPath, svc: CartApi) -> Row:
    return _found(await svc.get(customer_id), f"cart of customer {customer_id}")


# -- seller transactions -----------------------------------------------------------------------


@product.patch("", responses=_CHAIN)
async def update_price(body: PriceUpdateBody, app: CurrentApp, svc: ProductApi) -> Row:
    """PRICE_UPDATE: answers when the carts have the new price.

    404 for an unknown product; 409 when ``version`` is not the product's current version or
    ``instanceId`` named another request. A repeat publishes nothing and gets the first answer.
    """
    tid = _tid(body.instance_id)
    what = f"product {body.seller_id}/{body.product_id}"
    with correlate(tid):
        change = await svc.update_price(body, tid)
    _refused(change, tid, what)
    if change is Change.STALE:
        raise Conflict(f"{what} is not at version {body.version!r}", tid=tid)
    mark = await app.outcome(tid, PriceUpdateMark, timeout=settings().outcome_timeout)
    return _concluded(mark)


@product.put("", responses=_CHAIN)
async def replace_product(body: ProductReplacement, app: CurrentApp, svc: ProductApi) -> Row:
    """UPDATE_PRODUCT: a new version (its tid); answers when the stock sells only that version.

    404 for an unknown product; 409 when the product already has this version or the version
    named another request. A repeat publishes nothing and gets the first answer.
    """
    tid = body.version
    what = f"product {body.seller_id}/{body.product_id}"
    with correlate(tid):
        change = await svc.replace(body, tid)
    _refused(change, tid, what)
    if change is Change.STALE:
        raise Conflict(f"{what} is already at version {tid!r}", tid=tid)
    mark = await app.outcome(tid, ProductUpdateMark, timeout=settings().outcome_timeout)
    return _concluded(mark)


@seller.get("/dashboard/{seller_id}")
async def dashboard(seller_id: IdPath, svc: SellerApi) -> Row:
    """QUERY_DASHBOARD: the seller's open order entries and their totals, from one snapshot."""
    result: Row = await svc.dashboard(seller_id)
    return result


@shipment.patch("/{tid}")
async def update_delivery(tid: TidPath, svc: ShipmentApi) -> Row:
    """UPDATE_DELIVERY: deliver the oldest open order of up to 10 sellers."""
    return {"tid": tid, "delivered": await svc.update_delivery(tid)}


# -- reads -------------------------------------------------------------------------------------


@stock.get("/{seller_id}/{product_id}", responses=_answers(404))
async def get_stock(seller_id: IdPath, product_id: IdPath, svc: StockApi) -> Row:
    return _found(await svc.get(seller_id, product_id), f"stock item {seller_id}/{product_id}")


@product.get("/{seller_id}/{product_id}", responses=_answers(404))
async def get_product(seller_id: IdPath, product_id: IdPath, svc: ProductApi) -> Row:
    return _found(await svc.get(seller_id, product_id), f"product {seller_id}/{product_id}")


@customer.get("/{customer_id}", responses=_answers(404))
async def get_customer(customer_id: IdPath, svc: CustomerApi) -> Row:
    return _found(await svc.get(customer_id), f"customer {customer_id}")


@seller.get("/{seller_id}", responses=_answers(404))
async def get_seller(seller_id: IdPath, svc: SellerApi) -> Row:
    return _found(await svc.get(seller_id), f"seller {seller_id}")


@order.get("/{customer_id}")
async def get_orders(customer_id: IdPath, svc: OrderApi) -> list[Row]:
    """The customer's orders, each with its items and status."""
    result: list[Row] = await svc.orders_of(customer_id)
    return result


@shipment.get("/{customer_id}")
async def get_shipments(customer_id: IdPath, svc: ShipmentApi) -> list[Row]:
    result: list[Row] = await svc.shipments_of(customer_id)
    return result


# -- operations --------------------------------------------------------------------------------


async def cleanup(app: App, *, restore: bool) -> None:
    """Wait for in-flight chains, then clear carts, orders, payments, shipments, entries.

    ``restore`` (``/reset``) also puts stock quantities and product versions back as ingested.
    """
    await app.drain()
    await app.service(Cart).cleanup()  # first: it gives the stock leases back
    await app.service(Order).cleanup()
    await app.service(Payment).cleanup()
    await app.service(Shipment).cleanup()
    await app.service(Seller).cleanup()
    await app.service(Customer).cleanup()
    await app.service(Stock).cleanup(restore=restore)
    if restore:
        await app.service(Product).restore_versions()
    await app.drain()


@ops.patch("/cleanup")
async def cleanup_route(app: CurrentApp) -> Row:
    await cleanup(app, restore=False)
    return {"status": "clean"}


@ops.patch("/reset")
async def reset_route(app: CurrentApp) -> Row:
    await cleanup(app, restore=True)
    return {"status": "reset"}


ROUTERS: dict[str, APIRouter] = {
    "cart": cart,
    "customer": customer,
    "order": order,
    "product": product,
    "seller": seller,
    "shipment": shipment,
    "stock": stock,
}
