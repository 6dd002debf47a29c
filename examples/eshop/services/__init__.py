"""The eight services of the Online Marketplace benchmark."""

from __future__ import annotations

from framework import Service
from vmsdb_eshop.services.cart import Cart
from vmsdb_eshop.services.customer import Customer
from vmsdb_eshop.services.order import Order
from vmsdb_eshop.services.payment import Payment
from vmsdb_eshop.services.product import Product
from vmsdb_eshop.services.seller import Seller
from vmsdb_eshop.services.shipment import Shipment
from vmsdb_eshop.services.stock import Stock

__all__ = ["SERVICES", "Cart", "Customer", "Order", "Payment", "Product", "Seller", "Shipment", "Stock"]

SERVICES: list[type[Service]] = [Cart, Customer, Order, Payment, Product, Seller, Shipment, Stock]
