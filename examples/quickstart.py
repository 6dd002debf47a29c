"""Two services from the README's tour: a stock that hands out leases and a cart that takes them.

Run ``vmsdb services examples.quickstart:app`` to see their descriptors and event dataflow.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Mapped, mapped_column

from framework import (
    App,
    Event,
    Inbound,
    Lease,
    LeaseGrant,
    Outbound,
    Service,
    Transactional,
    send,
    session,
)


class AddCartItemRequest(Event, key="customer_id"):
    customer_id: str
    item_id: str
    qty: int


class AddCartItemAttempt(Event, key="customer_id"):
    customer_id: str
    item_id: str
    qty: int
    ok: bool


class Stock(Service, name="stock"):
    @Lease("FROM StockItem s WHERE s.id = :item_id FOR UPDATE DECREMENT s.qty BY :qty WITH PERIOD :period")
    async def get_stock_item_info(self, item_id: str, qty: int, period: timedelta) -> LeaseGrant | None: ...


@Stock.export
class StockItem(Stock.Model):
    __tablename__ = "stock_items"
    id: Mapped[str] = mapped_column(primary_key=True)
    qty: Mapped[int]
    price: Mapped[int] = mapped_column(default=0)


class Cart(Service, name="cart"):
    stock: Stock

    @Inbound(AddCartItemRequest)
    @Outbound(AddCartItemAttempt)
    @Transactional(type="RW", isolation="serializable")
    async def handle_add_cart_item(self, req: AddCartItemRequest) -> None:
        grant = await self.stock.get_stock_item_info(req.item_id, req.qty, timedelta(hours=1))
        if grant is not None:
            session().add(CartItem(customer_id=req.customer_id, item_id=req.item_id, qty=req.qty))
        send(
            AddCartItemAttempt(
                customer_id=req.customer_id, item_id=req.item_id, qty=req.qty, ok=grant is not None
            )
        )


class CartItem(Cart.Model):
    __tablename__ = "cart_items"
    customer_id: Mapped[str] = mapped_column(primary_key=True)
    item_id: Mapped[str] = mapped_column(primary_key=True)
    qty: Mapped[int]


app = App([Stock, Cart])
