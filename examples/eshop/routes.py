"""The eShop's HTTP API: the Online Marketplace driver's routes, one router per service.

Checkout, price update and product update answer when their event chain's outcome is known,
with the chain's transaction mark (``{tid, type, actorId, status, source}``); a chain that
ends NOT_ACCEPTED answers 409 with the same fields. Everything else answers synchronously.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, status

from framework import App, Event, correlate
from framework.fastapi import Conflict, CurrentApp, publish_and_wait, service
from vmsdb_eshop.config import settings
from vmsdb_eshop.events import (
    CheckoutMark,
    CheckoutRequest,
    PriceUpdateMark,
    ProductUpdateMark,
    TransactionMark,
)
from vmsdb_eshop.schemas import (
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

__all__ = ["ROUTERS", "NotFound", "cleanup", "ops"]

#: Event ids of checkout requests derive from (customer, tid): a retried request (the driver
#: tries up to three times) publishes nothing new and gets the first attempt's outcome.
_CHECKOUT_IDS = uuid.UUID("6d1f0c52-8a54-4c1e-9a55-0f8f5a6b2c11")

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


class NotFound(LookupError):
    """No such entity (HTTP 404)."""


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


cart = APIRouter(prefix="/cart", tags=["cart"])
customer = APIRouter(prefix="/customer", tags=["customer"])
order = APIRouter(prefix="/order", tags=["order"])
product = APIRouter(prefix="/product", tags=["product"])
seller = APIRouter(prefix="/seller", tags=["seller"])
shipment = APIRouter(prefix="/shipment", tags=["shipment"])
stock = APIRouter(prefix="/stock", tags=["stock"])
ops = APIRouter(tags=["operations"])

# -- ingestion ---------------------------------------------------------------------------------


@seller.post("", status_code=status.HTTP_201_CREATED)
async def ingest_seller(row: SellerRow, svc: SellerApi) -> Row:
    await svc.ingest([row])
    return row.model_dump()


@customer.post("", status_code=status.HTTP_201_CREATED)
async def ingest_customer(row: CustomerRow, svc: CustomerApi) -> Row:
    await svc.ingest([row])
    return row.model_dump()


@product.post("", status_code=status.HTTP_201_CREATED)
async def ingest_product(row: ProductData, svc: ProductApi) -> Row:
    await svc.ingest([row])
    return row.model_dump()


@stock.post("", status_code=status.HTTP_201_CREATED)
async def ingest_stock(row: StockRow, svc: StockApi) -> Row:
    await svc.ingest([row])
    return row.model_dump()


# -- customer session --------------------------------------------------------------------------


@cart.patch("/{customer_id}/add")
async def add_to_cart(customer_id: int, item: CartItemBody, svc: CartApi) -> Row:
    """Add an item; its quantity is held by a stock lease when there is enough (``reserved``)."""
    result: Row = await svc.add_item(customer_id, item)
    return result


@cart.post("/{customer_id}/checkout")
async def checkout(customer_id: int, body: CheckoutBody, app: CurrentApp) -> Row:
    """Check the cart out; answers when the order is shipped (200) or not accepted (409)."""
    tid = _tid(body.instance_id)
    fields = {**body.model_dump(), "customer_id": customer_id, "instance_id": tid}
    request = CheckoutRequest(customer_id=customer_id, tid=tid, checkout=CustomerCheckout(**fields))
    event_id = uuid.uuid5(_CHECKOUT_IDS, f"{customer_id}/{tid}")
    mark = await publish_and_wait(
        app, request, tid, CheckoutMark, timeout=settings().outcome_timeout, event_id=event_id
    )
    return _concluded(mark)


@cart.patch("/{customer_id}/seal")
async def seal_cart(customer_id: int, svc: CartApi) -> Row:
    """Empty the cart and release its stock leases."""
    return {"customer_id": customer_id, "dropped": await svc.seal(customer_id)}


@cart.get("/{customer_id}/history/{tid}")
async def cart_history(customer_id: int, tid: str, svc: CartApi) -> list[Row]:
    """The items transaction ``tid`` checked out, at the prices charged."""
    result: list[Row] = await svc.history(customer_id, tid)
    return result


@cart.get("/{customer_id}")
async def get_cart(customer_id: int, svc: CartApi) -> Row:
    return _found(await svc.get(customer_id), f"cart of customer {customer_id}")


# -- seller transactions -----------------------------------------------------------------------


@product.patch("")
async def update_price(body: PriceUpdateBody, app: CurrentApp, svc: ProductApi) -> Row:
    """PRICE_UPDATE: answers when the carts have the new price."""
    tid = _tid(body.instance_id)
    with correlate(tid):
        known = await svc.update_price(body.seller_id, body.product_id, body.price, body.version, tid)
    _found(known or None, f"product {body.seller_id}/{body.product_id}")
    mark = await app.outcome(tid, PriceUpdateMark, timeout=settings().outcome_timeout)
    return _concluded(mark)


@product.put("")
async def replace_product(body: ProductReplacement, app: CurrentApp, svc: ProductApi) -> Row:
    """UPDATE_PRODUCT: a new version (its tid); answers when the stock sells only that version."""
    tid = body.version
    with correlate(tid):
        await svc.replace(body, tid)
    mark = await app.outcome(tid, ProductUpdateMark, timeout=settings().outcome_timeout)
    return _concluded(mark)


@seller.get("/dashboard/{seller_id}")
async def dashboard(seller_id: int, svc: SellerApi) -> Row:
    """QUERY_DASHBOARD: the seller's open order entries and their totals, from one snapshot."""
    result: Row = await svc.dashboard(seller_id)
    return result


@shipment.patch("/{tid}")
async def update_delivery(tid: str, svc: ShipmentApi) -> Row:
    """UPDATE_DELIVERY: deliver the oldest open order of up to 10 sellers."""
    return {"tid": tid, "delivered": await svc.update_delivery(tid)}


# -- reads -------------------------------------------------------------------------------------


@stock.get("/{seller_id}/{product_id}")
async def get_stock(seller_id: int, product_id: int, svc: StockApi) -> Row:
    return _found(await svc.get(seller_id, product_id), f"stock item {seller_id}/{product_id}")


@product.get("/{seller_id}/{product_id}")
async def get_product(seller_id: int, product_id: int, svc: ProductApi) -> Row:
    return _found(await svc.get(seller_id, product_id), f"product {seller_id}/{product_id}")


@customer.get("/{customer_id}")
async def get_customer(customer_id: int, svc: CustomerApi) -> Row:
    return _found(await svc.get(customer_id), f"customer {customer_id}")


@seller.get("/{seller_id}")
async def get_seller(seller_id: int, svc: SellerApi) -> Row:
    return _found(await svc.get(seller_id), f"seller {seller_id}")


@order.get("/{customer_id}")
async def get_orders(customer_id: int, svc: OrderApi) -> list[Row]:
    """The customer's orders, each with its items and status."""
    result: list[Row] = await svc.orders_of(customer_id)
    return result


@shipment.get("/{customer_id}")
async def get_shipments(customer_id: int, svc: ShipmentApi) -> list[Row]:
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
