"""Data shapes of the eShop: status enums, rows, and the HTTP bodies of the benchmark's API.

Key casing follows the Online Marketplace driver: ingestion rows and products are snake_case,
cart items and checkouts PascalCase (with a lower-case ``instanceId``), price updates camelCase.
Each HTTP body subclasses the snake_case shape that travels in events, so the field list is
written once and only the wire names differ.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel, to_pascal

__all__ = [
    "AFTER_SHIPMENT",
    "OPEN_ORDER_STATUSES",
    "PAID_ORDER_STATUSES",
    "CartItem",
    "CartItemBody",
    "CartStatus",
    "CheckoutBody",
    "CustomerCheckout",
    "CustomerRow",
    "DiscountRow",
    "ItemStatus",
    "MarkStatus",
    "Money",
    "OrderItem",
    "OrderStatus",
    "PackageStatus",
    "PaymentType",
    "PriceUpdateBody",
    "ProductData",
    "ProductReplacement",
    "SellerRow",
    "ShipmentStatus",
    "StockRow",
    "TransactionType",
]

#: Money: non-negative, two decimals at most (prices, freight, vouchers).
Money = Annotated[Decimal, Field(ge=0, max_digits=14, decimal_places=2)]
Quantity = Annotated[int, Field(ge=1, le=10_000)]
Id = Annotated[int, Field(ge=0)]


class PaymentType(StrEnum):
    CREDIT_CARD = "CREDIT_CARD"
    DEBIT_CARD = "DEBIT_CARD"
    BOLETO = "BOLETO"
    VOUCHER = "VOUCHER"


class OrderStatus(StrEnum):
    INVOICED = "INVOICED"
    PAYMENT_PROCESSED = "PAYMENT_PROCESSED"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    READY_FOR_SHIPMENT = "READY_FOR_SHIPMENT"
    IN_TRANSIT = "IN_TRANSIT"
    DELIVERED = "DELIVERED"


#: Orders whose items were sold (payment went through).
PAID_ORDER_STATUSES = (
    OrderStatus.PAYMENT_PROCESSED,
    OrderStatus.READY_FOR_SHIPMENT,
    OrderStatus.IN_TRANSIT,
    OrderStatus.DELIVERED,
)
#: Order entries the seller dashboard aggregates (MarketplaceOnDapr's order_seller_view).
OPEN_ORDER_STATUSES = (
    OrderStatus.INVOICED,
    OrderStatus.PAYMENT_PROCESSED,
    OrderStatus.READY_FOR_SHIPMENT,
    OrderStatus.IN_TRANSIT,
)


class PackageStatus(StrEnum):
    SHIPPED = "shipped"
    DELIVERED = "delivered"


class ShipmentStatus(StrEnum):
    APPROVED = "approved"
    DELIVERY_IN_PROGRESS = "delivery_in_progress"
    CONCLUDED = "concluded"


#: What a shipment notification does to an order (and its seller entries).
AFTER_SHIPMENT = {
    ShipmentStatus.APPROVED: OrderStatus.READY_FOR_SHIPMENT,
    ShipmentStatus.DELIVERY_IN_PROGRESS: OrderStatus.IN_TRANSIT,
    ShipmentStatus.CONCLUDED: OrderStatus.DELIVERED,
}


class ItemStatus(StrEnum):
    IN_STOCK = "IN_STOCK"
    OUT_OF_STOCK = "OUT_OF_STOCK"
    UNAVAILABLE = "UNAVAILABLE"
    DELETED = "DELETED"
    PRICE_DIVERGENCE = "PRICE_DIVERGENCE"


class CartStatus(StrEnum):
    OPEN = "OPEN"
    CHECKOUT_SENT = "CHECKOUT_SENT"


class TransactionType(StrEnum):
    CUSTOMER_SESSION = "CUSTOMER_SESSION"
    QUERY_DASHBOARD = "QUERY_DASHBOARD"
    PRICE_UPDATE = "PRICE_UPDATE"
    UPDATE_PRODUCT = "UPDATE_PRODUCT"
    UPDATE_DELIVERY = "UPDATE_DELIVERY"


class MarkStatus(StrEnum):
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    ABORT = "ABORT"
    NOT_ACCEPTED = "NOT_ACCEPTED"


class _Shape(BaseModel):
    """Frozen data; versions arrive as numbers or strings and are kept as strings."""

    model_config = ConfigDict(frozen=True, coerce_numbers_to_str=True)


class _Row(_Shape):
    """An ingestion row: snake_case, extra columns of the driver's tables ignored."""

    model_config = ConfigDict(extra="ignore")


# -- ingestion rows (POST /seller, /customer, /product, /stock) --------------------------------


class SellerRow(_Row):
    id: Id
    name: str = ""
    company_name: str = ""
    email: str = ""
    phone: str = ""
    mobile_phone: str = ""
    cpf: str = ""
    cnpj: str = ""
    address: str = ""
    complement: str = ""
    city: str = ""
    state: str = ""
    zip_code: str = ""


class CustomerRow(_Row):
    id: Id
    first_name: str
    last_name: str
    address: str = ""
    complement: str = ""
    birth_date: str = ""
    zip_code: str = ""
    city: str = ""
    state: str = ""
    card_number: str = ""
    card_security_number: str = ""
    card_expiration: str = ""
    card_holder_name: str = ""
    card_type: str = ""
    success_payment_count: int = 0
    failed_payment_count: int = 0
    delivery_count: int = 0
    data: str = ""


class ProductData(_Row):
    """A product as ingested, replaced (PUT /product) and carried by ProductUpdated."""

    seller_id: Id
    product_id: Id
    name: str
    sku: str = ""
    category: str = ""
    description: str = ""
    price: Money
    freight_value: Money = Decimal(0)
    status: str = "approved"
    version: str = "0"


class ProductReplacement(ProductData):
    """PUT /product: the full product with its new ``version`` (the transaction id)."""

    version: str = Field(min_length=1, max_length=200)


class StockRow(_Row):
    seller_id: Id
    product_id: Id
    qty_available: Annotated[int, Field(ge=0)]
    qty_reserved: Annotated[int, Field(ge=0)] = 0
    order_count: int = 0
    ytd: int = 0
    data: str = ""
    version: str = "0"


class DiscountRow(_Row):
    """A customer's discount at one seller (customer service, read by order's @Query)."""

    customer_id: Id
    seller_id: Id
    percent: Annotated[int, Field(ge=0, le=100)]
    expires_at: datetime


# -- cart items and checkouts (internal snake_case, HTTP PascalCase) -----------------------------


class CartItemFields(_Shape):
    seller_id: Id
    product_id: Id
    product_name: str = ""
    unit_price: Money
    freight_value: Money = Decimal(0)
    quantity: Quantity
    voucher: Money = Decimal(0)
    version: str = "0"


class CartItem(CartItemFields):
    """A cart item as it travels in ReserveStock/StockConfirmed: with its stock lease, if any."""

    lease_id: UUID | None = None


class CartItemBody(CartItemFields):
    """PATCH /cart/{customerId}/add: ``{SellerId, ProductId, ..., Voucher, Version}``."""

    model_config = ConfigDict(alias_generator=to_pascal, validate_by_name=True, validate_by_alias=True)


class CheckoutFields(_Shape):
    customer_id: Id
    first_name: str = ""
    last_name: str = ""
    street: str = ""
    complement: str = ""
    city: str = ""
    state: str = ""
    zip_code: str = ""
    payment_type: PaymentType
    card_number: str = ""
    card_holder_name: str = ""
    card_expiration: str = ""
    card_security_number: str = ""
    card_brand: str = ""
    installments: Annotated[int, Field(ge=0, le=24)] = 1
    instance_id: str | None = None


class CustomerCheckout(CheckoutFields):
    """The checkout request as the chain carries it (the benchmark's CustomerCheckout)."""


class CheckoutBody(CheckoutFields):
    """POST /cart/{customerId}/checkout: PascalCase fields and ``instanceId`` (the TID)."""

    model_config = ConfigDict(alias_generator=to_pascal, validate_by_name=True, validate_by_alias=True)
    instance_id: str | None = Field(default=None, alias="instanceId", min_length=1, max_length=200)


class PriceUpdateBody(_Shape):
    """PATCH /product: ``{sellerId, productId, price, version, instanceId}``."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, validate_by_alias=True)
    seller_id: Id
    product_id: Id
    price: Money
    version: str
    instance_id: str | None = Field(default=None, min_length=1, max_length=200)


class OrderItem(_Shape):
    """One invoiced line: the cart item and its totals (carried by InvoiceIssued and after)."""

    seller_id: int
    product_id: int
    product_name: str
    unit_price: Decimal
    freight_value: Decimal
    quantity: int
    version: str
    total_items: Decimal
    total_amount: Decimal
    total_incentive: Decimal
    #: When the seller must hand the item to the carrier (order_items.shipping_limit_date).
    shipping_limit_date: datetime | None = None
    #: The product's category, for the seller's entry (order_entries.product_category).
    product_category: str = ""


def card_expired(expiration: str, on: date) -> bool:
    """``MMyy`` card expiration before the month of ``on``; unparsable counts as expired."""
    if len(expiration) != 4 or not expiration.isdigit():
        return True
    month, year = int(expiration[:2]), 2000 + int(expiration[2:])
    return not 1 <= month <= 12 or (year, month) < (on.year, on.month)
