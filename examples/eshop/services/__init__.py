"""The eight services of the Online Marketplace benchmark."""

from __future__ import annotations

from examples.eshop.services.cart import Cart
from examples.eshop.services.customer import Customer
from examples.eshop.services.order import Order
from examples.eshop.services.payment import Payment
from examples.eshop.services.product import Product
from examples.eshop.services.seller import Seller
from examples.eshop.services.shipment import Shipment
from examples.eshop.services.stock import Stock
from framework import Service

__all__ = ["SERVICES", "Cart", "Customer", "Order", "Payment", "Product", "Seller", "Shipment", "Stock"]

SERVICES: list[type[Service]] = [Cart, Customer, Order, Payment, Product, Seller, Shipment, Stock]
