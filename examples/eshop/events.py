"""The eShop's events (the benchmark's, MarketplaceOnOrleans ``Common/Events``).

The checkout chain is keyed by ``customer_id``: every subscriber sees one customer's events in
commit order, so payment and shipment news never overtake the order they are about. Product
news is keyed by ``seller_id``: a seller's price updates and replacements reach the cart and the
stock in the order the product service committed them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import ClassVar, Self

from pydantic import ConfigDict, Field

from framework import Event
from vmsdb_eshop.schemas import (
    CartItem,
    CustomerCheckout,
    ItemStatus,
    MarkStatus,
    OrderItem,
    ProductData,
    ShipmentStatus,
    TransactionType,
)

__all__ = [
    "CheckoutMark",
    "CheckoutRequest",
    "DeliveryNotification",
    "InvoiceIssued",
    "PaymentConfirmed",
    "PaymentFailed",
    "PriceUpdateMark",
    "PriceUpdated",
    "ProductUpdateMark",
    "ProductUpdated",
    "RejectedItem",
    "ReserveStock",
    "ReserveStockFailed",
    "ShipmentNotification",
    "StockConfirmed",
    "TransactionMark",
]


# -- customer session (checkout) ---------------------------------------------------------------


class CheckoutRequest(Event, key="customer_id"):
    """Published by POST /cart/{customerId}/checkout; the cart turns it into ReserveStock."""

    customer_id: int
    tid: str
    checkout: CustomerCheckout


class RejectedItem(CartItem):
    status: ItemStatus


class ReserveStock(Event, key="customer_id"):
    """The items to reserve; ``dropped`` are those the cart left out, and why."""

    customer_id: int
    tid: str
    customer: CustomerCheckout
    items: list[CartItem]
    dropped: list[RejectedItem] = []


class ReserveStockFailed(Event, key="customer_id"):
    """No item of a checkout could be reserved; ``items`` says why for each one."""

    customer_id: int
    tid: str
    items: list[RejectedItem]


class StockConfirmed(Event, key="customer_id"):
    """The items the stock reserved (at least one); ``rejected`` lists the others and why."""

    customer_id: int
    tid: str
    customer: CustomerCheckout
    items: list[CartItem]
    rejected: list[RejectedItem] = []


class _OrderEvent(Event):
    customer_id: int
    tid: str
    order_id: int


class InvoiceIssued(_OrderEvent, key="customer_id"):
    customer: CustomerCheckout
    invoice_number: str
    issue_date: datetime
    total_invoice: Decimal
    items: list[OrderItem]


class PaymentConfirmed(_OrderEvent, key="customer_id"):
    customer: CustomerCheckout
    total_amount: Decimal
    items: list[OrderItem]
    date: datetime


class PaymentFailed(_OrderEvent, key="customer_id"):
    customer: CustomerCheckout
    total_amount: Decimal
    items: list[OrderItem]
    status: str


class ShipmentNotification(_OrderEvent, key="customer_id"):
    status: ShipmentStatus
    event_date: datetime


class DeliveryNotification(_OrderEvent, key="customer_id"):
    package_id: int
    seller_id: int
    product_id: int
    product_name: str
    status: str
    delivery_date: datetime


# -- seller updates ----------------------------------------------------------------------------


class PriceUpdated(Event, key="seller_id"):
    """Always published by a price update; ``revision`` orders it among the product's changes.

    The price only applies to replicas holding ``version``: a price update for a replaced
    version changes nothing downstream.
    """

    seller_id: int
    product_id: int
    price: Decimal
    version: str
    revision: int
    tid: str


class ProductUpdated(Event, key="seller_id"):
    """A product was ingested (``tid`` None) or replaced by a new version (``tid`` = version)."""

    seller_id: int
    product_id: int
    product: ProductData
    active: bool = True
    revision: int
    tid: str | None = None


# -- transaction marks (the driver's completion signal) ----------------------------------------


class TransactionMark(Event, key="tid"):
    """``{tid, type, actorId, status, source}``: a benchmark transaction's end.

    One subclass per transaction type, named as the driver's topics (``TransactionMark_<TYPE>``).
    """

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True, validate_by_alias=True)
    mark_type: ClassVar[TransactionType]

    tid: str
    type: TransactionType
    actor_id: str = Field(alias="actorId")
    status: MarkStatus
    source: str
    #: Why a transaction was not accepted (not part of the benchmark's record).
    reason: str | None = None

    @classmethod
    def of(cls, tid: str, actor: object, status: MarkStatus, source: str, reason: str | None = None) -> Self:
        """A mark of this class's transaction type."""
        return cls(
            tid=tid, type=cls.mark_type, actor_id=str(actor), status=status, source=source, reason=reason
        )


class CheckoutMark(TransactionMark, name="TransactionMark_CUSTOMER_SESSION"):
    mark_type = TransactionType.CUSTOMER_SESSION


class PriceUpdateMark(TransactionMark, name="TransactionMark_PRICE_UPDATE"):
    mark_type = TransactionType.PRICE_UPDATE


class ProductUpdateMark(TransactionMark, name="TransactionMark_UPDATE_PRODUCT"):
    mark_type = TransactionType.UPDATE_PRODUCT
