"""Cart: customers' carts, the stock leases their items hold, and a replica of the products.

Add-to-cart leases the item's quantity from the stock (``@Lease``, through the ``stock`` handle)
and keeps the lease id with the item; checkout hands the leases to the stock, which consumes
them. The product replica follows ProductUpdated and PriceUpdated, guarded by the product's
revision, and both handlers take ``precedence`` over checkout: a checkout sees every product
change committed before it.

Checkout follows the benchmark: the cart becomes CHECKOUT_SENT; an item whose replica shows the
same version at a different price is dropped (PRICE_DIVERGENCE), one whose product was deleted
(DELETED) or replaced (UNAVAILABLE) too; the others go to the stock at the price the cart holds
(a price update of the item's version has already rewritten it).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import (
    RowMapping,
    Select,
    String,
    Update,
    and_,
    bindparam,
    delete,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.orm import Mapped, mapped_column

from framework import (
    Inbound,
    Outbound,
    Query,
    Service,
    Transactional,
    connection,
    release_leases,
    send,
    session,
)
from vmsdb_eshop.config import settings
from vmsdb_eshop.events import (
    CheckoutMark,
    CheckoutRequest,
    PriceUpdated,
    PriceUpdateMark,
    ProductUpdated,
    RejectedItem,
    ReserveStock,
)
from vmsdb_eshop.schemas import CartItem, CartItemFields, CartStatus, CustomerCheckout, ItemStatus, MarkStatus
from vmsdb_eshop.services.common import (
    RowsInsert,
    as_row,
    clear,
    money_column,
    now,
    rows,
    timestamp_column,
)
from vmsdb_eshop.services.stock import Stock

__all__ = [
    "Cart",
    "CartHistory",
    "CartLine",
    "CartRecord",
    "CheckoutClaim",
    "ReplicaProduct",
    "UnknownEntity",
]


class UnknownEntity(LookupError):
    """A cart call named a customer or a product that does not exist."""


class Cart(Service, name="cart"):
    stock: Stock

    @Query(
        "SELECT EXISTS (SELECT 1 FROM CustomerRecord c WHERE c.id = :customer_id) AS customer, "
        "EXISTS (SELECT 1 FROM ProductRecord p "
        "WHERE p.seller_id = :seller_id AND p.product_id = :product_id) AS product"
    )
    async def known(self, customer_id: int, seller_id: int, product_id: int) -> list[dict[str, bool]]:
        """Whether the customer and the product exist (one row), read from the customer's and
        the product's own tables in the caller's transaction."""
        ...

    # Read committed: the lease grant runs in this transaction and must see leases committed
    # while it waited for the stock row's lock (see Stock.reserve).
    @Transactional(isolation="read_committed")
    async def add_item(self, customer_id: int, item: CartItemFields) -> dict[str, Any]:
        """Put ``item`` in the cart, holding its quantity with a stock lease when there is enough.

        Adding a product that is already in the cart replaces it (and its lease). Raises
        :class:`UnknownEntity` (nothing written) for an unknown customer or product: one call
        and one transaction do what took three calls.
        """
        known = (await self.known(customer_id, item.seller_id, item.product_id))[0]
        if not known["customer"]:
            raise UnknownEntity(f"customer {customer_id} does not exist")
        if not known["product"]:
            raise UnknownEntity(f"product {item.seller_id}/{item.product_id} does not exist")
        conn = connection()
        key = {"customer_id": customer_id, "seller_id": item.seller_id, "product_id": item.product_id}
        # First, and a statement of its own: the upsert locks the customer's cart row, so two
        # adds of one customer (or an add and a checkout or seal) run one after the other, and
        # each statement below, with a read committed snapshot of its own, sees the line the
        # other wrote: the lease it replaces is given back, never left held by no line.
        await conn.execute(_OPEN_CART, {"customer_id": customer_id, "at": now()})
        replaced = await conn.scalar(_LINE_LEASE, key)
        if replaced is not None:  # given back before the new hold, which may then use it
            await release_leases([replaced], granted_by=self.stock.hold)  # refused: held nothing
        grant = await self.stock.hold(item.seller_id, item.product_id, item.quantity, settings().lease_period)
        values = {
            **item.model_dump(),
            "customer_id": customer_id,
            "lease_id": None if grant is None else grant.id,
        }
        written = await conn.execute(_PUT_LINE, values)
        return {**written.mappings().one(), "reserved": grant is not None}

    @Outbound(CheckoutRequest)
    @Transactional(isolation="read_committed")
    async def start_checkout(self, customer_id: int, tid: str, checkout: CustomerCheckout) -> int:
        """Bind checkout id ``tid`` to ``customer_id`` and, the first time, send the checkout
        request (to :meth:`checkout`, in this service); returns the customer the id is bound to.

        A checkout's events and outcome are found by its id, so an id must name one customer's
        checkout: an id bound to another customer sends nothing, and neither does a repeat of
        the same customer's (its outcome is the first one's). The binding and the request
        commit together, so a crash between them cannot leave a bound id that never checks out.
        One statement: on a conflict the upsert waits for a concurrent claim of the same id to
        commit, locks its row and returns the customer it names, and whether this call
        inserted it (DO NOTHING would return nothing, and a second statement would be needed).
        """
        owner, inserted = (
            await connection().execute(_CLAIM_CHECKOUT, {"tid": tid, "customer_id": customer_id})
        ).one()
        if inserted:
            send(CheckoutRequest(customer_id=customer_id, tid=tid, checkout=checkout))
        return int(owner)

    @Transactional
    async def seal(self, customer_id: int) -> int:
        """Empty the cart and give its leases back; returns how many items were dropped."""
        opened = (
            update(CartRecord)
            .where(CartRecord.customer_id == customer_id)
            .values(status=CartStatus.OPEN)
            .returning(CartRecord.customer_id)
            .cte("opened")
        )
        # The cart row first, then its lines (the lines are deleted through ``opened``): the
        # order add_item and checkout lock them in.
        dropped = (
            await connection().scalars(
                delete(CartLine)
                .where(CartLine.customer_id == opened.c.customer_id)
                .returning(CartLine.lease_id)
            )
        ).all()
        await release_leases([lease for lease in dropped if lease is not None], granted_by=self.stock.hold)
        return len(dropped)

    @Transactional(type="RO")
    async def get(self, customer_id: int) -> dict[str, Any] | None:
        cart = await session().get(CartRecord, customer_id)
        if cart is None:
            return None
        items = await rows(select(CartLine.__table__).where(CartLine.customer_id == customer_id))
        return {**as_row(cart), "items": items}

    @Transactional(type="RO")
    async def history(self, customer_id: int, tid: str) -> list[dict[str, Any]]:
        """The items checked out by transaction ``tid`` (the driver's anomaly check reads it)."""
        table = CartHistory.__table__
        return await rows(select(table).where(table.c.customer_id == customer_id, table.c.tid == tid))

    @Inbound(CheckoutRequest)
    @Outbound([ReserveStock, CheckoutMark])
    @Transactional
    async def checkout(self, event: CheckoutRequest) -> None:
        """Drop diverged or deleted items, record the rest, empty the cart, ask the stock."""
        lines = await self._take_lines(event.customer_id)
        if not lines:
            send(CheckoutMark.of(event.tid, event.customer_id, MarkStatus.NOT_ACCEPTED, "cart", "empty cart"))
            return
        items: list[CartItem] = []
        dropped: list[RejectedItem] = []
        for line in lines:
            status = _status(line)
            if status is ItemStatus.IN_STOCK:
                items.append(CartItem(**_fields(line)))
            else:
                dropped.append(RejectedItem(**_fields(line), status=status))
        await release_leases(
            [d.lease_id for d in dropped if d.lease_id is not None], granted_by=self.stock.hold
        )
        if items:
            history = [{"customer_id": event.customer_id, "tid": event.tid, **i.model_dump()} for i in items]
            await connection().execute(_HISTORY.statement, _HISTORY.params(history))
        if not items:
            why = ", ".join(f"{d.seller_id}/{d.product_id} {d.status}" for d in dropped)
            send(CheckoutMark.of(event.tid, event.customer_id, MarkStatus.NOT_ACCEPTED, "cart", why))
            return
        send(
            ReserveStock(
                customer_id=event.customer_id,
                tid=event.tid,
                customer=event.checkout,
                items=items,
                dropped=dropped,
            )
        )

    async def _take_lines(self, customer_id: int) -> list[RowMapping]:
        """Mark the cart CHECKOUT_SENT and delete its lines, in one statement; the lines, each
        with its product's replica (``replica_*``, NULL when there is none), by key.

        The cart row is locked first and the lines are deleted through it (``sent``), the order
        add_item locks them in; an empty cart is left as it is. The lines returned are exactly
        the lines deleted: one added concurrently (after this statement's snapshot) stays in
        the cart, it is not lost without a history row.
        """
        found = await connection().execute(_TAKE_LINES, {"by_customer": customer_id, "at": now()})
        return list(found.mappings())

    @Inbound(PriceUpdated, precedence=CheckoutRequest)
    @Outbound(PriceUpdateMark)
    @Transactional
    async def on_price_updated(self, event: PriceUpdated) -> None:
        """Apply a newer price of the replica's version to the replica and to open carts.

        One statement: the carts' lines are repriced only through ``applied``, the replica's
        update, which is empty when the replica holds another version or a newer revision.
        """
        await connection().execute(
            _REPRICE,
            {
                "by_seller": event.seller_id,
                "by_product": event.product_id,
                "by_version": event.version,
                "revision": event.revision,
                "price": event.price,
                "at": now(),
            },
        )
        send(PriceUpdateMark.of(event.tid, event.seller_id, MarkStatus.SUCCESS, "cart"))

    @Inbound(ProductUpdated, precedence=CheckoutRequest)
    @Transactional
    async def on_product_updated(self, event: ProductUpdated) -> None:
        """Upsert the replica, unless it already holds a newer revision."""
        product = event.product
        await connection().execute(
            _PUT_REPLICA,
            {
                "seller_id": event.seller_id,
                "product_id": event.product_id,
                "name": product.name,
                "price": product.price,
                "freight_value": product.freight_value,
                "version": product.version,
                "active": event.active,
                "revision": event.revision,
                "updated_at": now(),
            },
        )

    @Transactional
    async def cleanup(self) -> None:
        """Release every lease, empty every cart and forget the history."""
        held = await connection().scalars(select(CartLine.lease_id).where(CartLine.lease_id.is_not(None)))
        await release_leases([lease for lease in held if lease is not None], granted_by=self.stock.hold)
        await clear(CartLine, CartHistory, CartRecord)


def _status(line: RowMapping) -> ItemStatus:
    """Whether checkout sends ``line`` to the stock (IN_STOCK) or drops it, and why; ``line``
    carries its product's replica as ``replica_active``, ``replica_version`` and
    ``replica_price`` (all NULL when the cart has no replica of it).

    The replica is never behind what a checkout must see: a price update is acknowledged only
    after the cart applied it (a replacement after the stock did), and the cart's handlers of
    both take precedence over checkout, so every change committed before a checkout reaches the
    replica first.
    So a line at another version than the replica's is of a replaced version (UNAVAILABLE, as
    the stock would answer), and one at the replica's version but another price was added with a
    stale price (PRICE_DIVERGENCE). Dropping the first here, not only at the stock, keeps a stale
    line out of the checkout's history: without it a cart could hold x at a price older than an
    update acknowledged before y's, the benchmark's causal anomaly. An unknown product is left to
    the stock.
    """
    if line["replica_active"] is None:
        return ItemStatus.IN_STOCK
    if not line["replica_active"]:
        return ItemStatus.DELETED
    if line["replica_version"] != line["version"]:
        return ItemStatus.UNAVAILABLE
    if line["replica_price"] != line["unit_price"]:
        return ItemStatus.PRICE_DIVERGENCE
    return ItemStatus.IN_STOCK


def _fields(line: RowMapping) -> dict[str, Any]:
    return {name: line[name] for name in CartItem.model_fields}


#: A cart line's primary key: what an add of the same product replaces.
_LINE_KEY = ["customer_id", "seller_id", "product_id"]


class CartRecord(Cart.Model):
    __tablename__ = "carts"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default=CartStatus.OPEN)
    created_at: Mapped[datetime] = timestamp_column()
    updated_at: Mapped[datetime] = timestamp_column()


class _ItemColumns:
    """The columns of a cart item, shared by open carts and the checkout history."""

    seller_id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(primary_key=True)
    product_name: Mapped[str] = mapped_column(default="")
    unit_price: Mapped[Decimal] = money_column()
    freight_value: Mapped[Decimal] = money_column()
    quantity: Mapped[int]
    voucher: Mapped[Decimal] = money_column()
    version: Mapped[str] = mapped_column(String(200), default="0")
    lease_id: Mapped[UUID | None]


class CartLine(_ItemColumns, Cart.Model):
    __tablename__ = "cart_items"
    customer_id: Mapped[int] = mapped_column(primary_key=True)


class CartHistory(_ItemColumns, Cart.Model):
    """What each checkout took out of the cart, at the prices it was charged."""

    __tablename__ = "cart_history"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    tid: Mapped[str] = mapped_column(String(200), primary_key=True)


class CheckoutClaim(Cart.Model):
    """Which customer each checkout id (``instanceId``) belongs to; kept across ``/cleanup``,
    as the id keeps naming that checkout's events in the log."""

    __tablename__ = "checkout_ids"
    tid: Mapped[str] = mapped_column(String(200), primary_key=True)
    customer_id: Mapped[int]
    created_at: Mapped[datetime] = timestamp_column()


class ReplicaProduct(Cart.Model):
    """The cart's replica of product (name, price, version), kept by product events."""

    __tablename__ = "replica_products"
    seller_id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(default="")
    price: Mapped[Decimal] = money_column()
    freight_value: Mapped[Decimal] = money_column()
    version: Mapped[str] = mapped_column(String(200), default="0")
    active: Mapped[bool] = mapped_column(default=True)
    revision: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = timestamp_column()


# -- the hot statements, built once ------------------------------------------------------------
# A statement built in the call costs SQLAlchemy its construction, coercion and cache key on
# every execution; built once with bindparam()s it costs only the lookup of its compiled form
# (the README's "fast path for a hot handler"). Each one's story is told where it runs.

_OPEN_CART = (
    insert(CartRecord)
    .values(customer_id=bindparam("customer_id"), status=CartStatus.OPEN)
    .on_conflict_do_update(
        index_elements=["customer_id"], set_={"status": CartStatus.OPEN, "updated_at": bindparam("at")}
    )
)

_LINE_LEASE = select(CartLine.lease_id).where(
    *(CartLine.__table__.c[name] == bindparam(name) for name in _LINE_KEY)
)


def _put_line() -> Insert:
    columns = [c.key for c in CartLine.__table__.columns]
    line = insert(CartLine).values({name: bindparam(name) for name in columns})
    return line.on_conflict_do_update(
        index_elements=_LINE_KEY,
        set_={name: line.excluded[name] for name in columns if name not in _LINE_KEY},
    ).returning(*CartLine.__table__.columns)


_PUT_LINE = _put_line()

_CLAIM_CHECKOUT = (
    insert(CheckoutClaim)
    .values(tid=bindparam("tid"), customer_id=bindparam("customer_id"))
    .on_conflict_do_update(index_elements=["tid"], set_={"customer_id": CheckoutClaim.customer_id})
    # A row this statement inserted has no xmax yet; one it found and locked has (Postgres).
    .returning(CheckoutClaim.customer_id, literal_column("xmax = 0").label("inserted"))
)

_HISTORY = RowsInsert(CartHistory, ["customer_id", "tid", *CartItem.model_fields])


def _take_lines() -> Select[Any]:
    customer = bindparam("by_customer")
    has_lines = select(CartLine.customer_id).where(CartLine.customer_id == customer).exists()
    sent = (
        update(CartRecord)
        .where(CartRecord.customer_id == customer, has_lines)
        .values(status=CartStatus.CHECKOUT_SENT, updated_at=bindparam("at"))
        .returning(CartRecord.customer_id)
        .cte("sent")
    )
    taken = (
        delete(CartLine)
        .where(CartLine.customer_id == sent.c.customer_id)
        .returning(*CartLine.__table__.columns)
        .cte("taken")
    )
    replica = ReplicaProduct.__table__
    return (
        select(
            taken,
            replica.c.active.label("replica_active"),
            replica.c.version.label("replica_version"),
            replica.c.price.label("replica_price"),
        )
        .outerjoin(
            replica,
            and_(replica.c.seller_id == taken.c.seller_id, replica.c.product_id == taken.c.product_id),
        )
        .order_by(taken.c.seller_id, taken.c.product_id)
    )


_TAKE_LINES = _take_lines()


def _reprice() -> Update:
    replica = ReplicaProduct.__table__
    applied = (
        update(replica)
        .where(
            replica.c.seller_id == bindparam("by_seller"),
            replica.c.product_id == bindparam("by_product"),
            replica.c.version == bindparam("by_version"),
            replica.c.revision < bindparam("revision"),  # an older update never wins
        )
        .values(price=bindparam("price"), revision=bindparam("revision"), updated_at=bindparam("at"))
        .returning(replica.c.seller_id, replica.c.product_id, replica.c.version)
        .cte("applied")
    )
    return (
        update(CartLine)
        .where(
            CartLine.seller_id == applied.c.seller_id,
            CartLine.product_id == applied.c.product_id,
            CartLine.version == applied.c.version,
        )
        .values(unit_price=bindparam("price"))
    )


_REPRICE = _reprice()


def _put_replica() -> Insert:
    columns = [
        "seller_id",
        "product_id",
        "name",
        "price",
        "freight_value",
        "version",
        "active",
        "revision",
        "updated_at",
    ]
    statement = insert(ReplicaProduct).values({name: bindparam(name) for name in columns})
    return statement.on_conflict_do_update(
        index_elements=["seller_id", "product_id"],
        set_={name: statement.excluded[name] for name in columns if name not in ("seller_id", "product_id")},
        where=ReplicaProduct.revision < statement.excluded.revision,
    )


_PUT_REPLICA = _put_replica()
