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
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel, to_pascal

__all__ = [
    "AFTER_SHIPMENT",
    "INT32_MAX",
    "MAX_PRICE",
    "OPEN_ORDER_STATUSES",
    "PAID_ORDER_STATUSES",
    "CartItem",
    "CartItemBody",
    "CartStatus",
    "CheckoutBody",
    "Count",
    "CustomerCheckout",
    "CustomerRow",
    "DiscountRow",
    "Id",
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
    "Text",
    "Tid",
    "TransactionType",
]

#: The largest value of an ``Integer`` column (Postgres int4): every id and counter fits it.
INT32_MAX = 2**31 - 1
#: The largest unit price, freight or voucher: an invoice line (price x quantity) and the totals
#: of an order or a seller's view stay far inside the money columns' ``Numeric(14, 2)``.
MAX_PRICE = Decimal("100000.00")

#: Money: non-negative, two decimals at most, at most ``MAX_PRICE`` (prices, freight, vouchers).
Money = Annotated[Decimal, Field(ge=0, le=MAX_PRICE, max_digits=14, decimal_places=2)]
Quantity = Annotated[int, Field(ge=1, le=10_000)]
#: Ids of sellers, products, customers: non-negative int4.
Id = Annotated[int, Field(ge=0, le=INT32_MAX)]
#: Counters (payments, deliveries, stock quantities and totals): non-negative int4.
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]


#: Postgres text cannot hold NUL; the pattern also refuses lone surrogates (which JSON can
#: carry and UTF-8 cannot encode).
_STORABLE = r"^[^\x00]*$"

#: Free text (names, addresses, descriptions): unbounded ``varchar`` columns, bounded here.
Text = Annotated[str, Field(max_length=1000, pattern=_STORABLE)]
#: A product version and a transaction id (``instanceId``): ``varchar(200)`` columns.
Tid = Annotated[str, Field(min_length=1, max_length=200, pattern=_STORABLE)]
Version = Annotated[str, Field(max_length=200, pattern=_STORABLE)]
#: A product's status: ``varchar(20)``.
Status = Annotated[str, Field(max_length=20, pattern=_STORABLE)]


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
    name: Text = ""
    company_name: Text = ""
    email: Text = ""
    phone: Text = ""
    mobile_phone: Text = ""
    cpf: Text = ""
    cnpj: Text = ""
    address: Text = ""
    complement: Text = ""
    city: Text = ""
    state: Text = ""
    zip_code: Text = ""


class CustomerRow(_Row):
    id: Id
    first_name: Text
    last_name: Text
    address: Text = ""
    complement: Text = ""
    birth_date: Text = ""
    zip_code: Text = ""
    city: Text = ""
    state: Text = ""
    card_number: Text = ""
    card_security_number: Text = ""
    card_expiration: Text = ""
    card_holder_name: Text = ""
    card_type: Text = ""
    success_payment_count: Count = 0
    failed_payment_count: Count = 0
    delivery_count: Count = 0
    data: Text = ""


class ProductData(_Row):
    """A product as ingested, replaced (PUT /product) and carried by ProductUpdated."""

    seller_id: Id
    product_id: Id
    name: Text
    sku: Text = ""
    category: Text = ""
    description: Text = ""
    price: Money
    freight_value: Money = Decimal(0)
    status: Status = "approved"
    version: Version = "0"


class ProductReplacement(ProductData):
    """PUT /product: the full product with its new ``version`` (the transaction id)."""

    version: Tid


class StockRow(_Row):
    seller_id: Id
    product_id: Id
    qty_available: Count
    qty_reserved: Count = 0
    order_count: Count = 0
    ytd: Count = 0
    data: Text = ""
    version: Version = "0"

    @field_validator("qty_reserved")
    @classmethod
    def _within_available(cls, reserved: int, info: ValidationInfo) -> int:
        if reserved > info.data.get("qty_available", reserved):
            raise ValueError("must not exceed qty_available")
        return reserved


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
    product_name: Text = ""
    unit_price: Money
    freight_value: Money = Decimal(0)
    quantity: Quantity
    voucher: Money = Decimal(0)
    version: Version = "0"


class CartItem(CartItemFields):
    """A cart item as it travels in ReserveStock/StockConfirmed: with its stock lease, if any."""

    lease_id: UUID | None = None


class CartItemBody(CartItemFields):
    """PATCH /cart/{customerId}/add: ``{SellerId, ProductId, ..., Voucher, Version}``."""

    model_config = ConfigDict(alias_generator=to_pascal, validate_by_name=True, validate_by_alias=True)


class CheckoutFields(_Shape):
    customer_id: Id
    first_name: Text = ""
    last_name: Text = ""
    street: Text = ""
    complement: Text = ""
    city: Text = ""
    state: Text = ""
    zip_code: Text = ""
    #: How the customer pays: a card or a boleto (VOUCHER is only a payment line's type, for
    #: the incentives; an order paid "by voucher" would have no main payment line).
    payment_type: Literal[PaymentType.CREDIT_CARD, PaymentType.DEBIT_CARD, PaymentType.BOLETO]
    card_number: Text = ""
    card_holder_name: Text = ""
    card_expiration: Text = ""
    card_security_number: Text = ""
    card_brand: Text = ""
    installments: Annotated[int, Field(ge=0, le=24)] = 1
    instance_id: Tid | None = None


class CustomerCheckout(CheckoutFields):
    """The checkout request as the chain carries it (the benchmark's CustomerCheckout)."""


class CheckoutBody(CheckoutFields):
    """POST /cart/{customerId}/checkout: PascalCase fields and ``instanceId`` (the TID)."""

    model_config = ConfigDict(alias_generator=to_pascal, validate_by_name=True, validate_by_alias=True)
    instance_id: Tid | None = Field(default=None, alias="instanceId")


class PriceUpdateBody(_Shape):
    """PATCH /product: ``{sellerId, productId, price, version, instanceId}``."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, validate_by_alias=True)
    seller_id: Id
    product_id: Id
    price: Money
    version: Version
    instance_id: Tid | None = None


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
