"""Product: the catalogue of every seller; source of PriceUpdated and ProductUpdated.

Every change raises the product's ``revision``; events carry it, so replicas apply a change only
if it is newer than what they hold. Versions name what a cart item refers to: a price update
applies only to the current version, a replacement installs a new one.

Price updates and replacements are idempotent on their transaction id (``instanceId``; a
replacement's is its new ``version``): ``product_changes`` records which request each id named,
in the transaction that applies it. A repeat of the same request publishes nothing and is
answered with the first one's outcome; another request under a used id is refused.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import String, exists, select, update
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.orm import Mapped, mapped_column

from framework import Outbound, Service, Transactional, send, session
from vmsdb_eshop.events import PriceUpdated, ProductUpdated
from vmsdb_eshop.schemas import PriceUpdateBody, ProductData
from vmsdb_eshop.services.common import as_row, money_column, now, timestamp_column

__all__ = ["DELETED", "Change", "Product", "ProductChange", "ProductRecord"]

#: The product status that withdraws it from sale (a replacement may carry it).
DELETED = "deleted"


class Change(StrEnum):
    """What became of a price update or replacement request."""

    APPLIED = "APPLIED"  # applied now; its event is published
    REPEATED = "REPEATED"  # the same request came before under this id: nothing new
    TAKEN = "TAKEN"  # the id names another request
    UNKNOWN = "UNKNOWN"  # no such product
    #: A price update of a version other than the product's current one, or a replacement by
    #: the version the product already has.
    STALE = "STALE"


def _digest(kind: str, request: BaseModel) -> str:
    return hashlib.sha256(f"{kind}:{request.model_dump_json()}".encode()).hexdigest()


class Product(Service, name="product"):
    @Outbound(ProductUpdated)
    @Transactional
    async def ingest(self, products: list[ProductData]) -> int:
        """Insert or replace products; the cart's replica and the stock hear of each one."""
        for data in products:
            await self._put(data, tid=None)
        return len(products)

    @Outbound(ProductUpdated)
    @Transactional(isolation="read_committed")
    async def replace(self, data: ProductData, tid: str) -> Change:
        """UPDATE_PRODUCT: overwrite an existing product with a new version (``tid``)."""
        version = await _lock(data.seller_id, data.product_id)
        seen = await _seen(tid, "UPDATE_PRODUCT", data)
        if seen is not None:
            return seen
        if version is None:
            return Change.UNKNOWN
        if version == data.version:
            return Change.STALE
        if not await _record(tid, "UPDATE_PRODUCT", data):
            return await _seen(tid, "UPDATE_PRODUCT", data) or Change.TAKEN
        await self._put(data, tid=tid)
        return Change.APPLIED

    async def _put(self, data: ProductData, tid: str | None) -> None:
        """Insert or overwrite the product (one upsert), raising its revision; publish it."""
        table = ProductRecord.__table__
        values = data.model_dump()
        # A replacement with status "deleted" withdraws the product: carts drop it (DELETED).
        values["active"] = data.status != DELETED
        values["updated_at"] = now()
        first = insert(table).values(**values, revision=1)
        revision = await session().scalar(
            first.on_conflict_do_update(
                index_elements=["seller_id", "product_id"],
                set_={**{name: first.excluded[name] for name in values}, "revision": table.c.revision + 1},
            ).returning(table.c.revision)
        )
        send(
            ProductUpdated(
                seller_id=data.seller_id,
                product_id=data.product_id,
                product=data,
                active=values["active"],
                revision=revision,
                tid=tid,
            )
        )

    @Outbound(PriceUpdated)
    @Transactional(isolation="read_committed")
    async def update_price(self, request: PriceUpdateBody, tid: str) -> Change:
        """PRICE_UPDATE: set the price of the product's current version; publish PriceUpdated.

        Nothing changes and nothing is published unless the answer is ``APPLIED``.
        """
        version = await _lock(request.seller_id, request.product_id)
        seen = await _seen(tid, "PRICE_UPDATE", request)
        if seen is not None:
            return seen
        if version is None:
            return Change.UNKNOWN
        if version != request.version:
            return Change.STALE
        # Take the id and set the price in one statement: the UPDATE applies only if the INSERT
        # took the id (it waits for a concurrent holder of the id, as ``_record`` explains).
        taken = _claim(tid, "PRICE_UPDATE", request).cte("taken")
        table = ProductRecord.__table__
        revision = await session().scalar(
            update(table)
            .where(
                table.c.seller_id == request.seller_id,
                table.c.product_id == request.product_id,
                exists(taken.select()),
            )
            .values(price=request.price, revision=table.c.revision + 1, updated_at=now())
            .returning(table.c.revision)
        )
        if revision is None:
            return await _seen(tid, "PRICE_UPDATE", request) or Change.TAKEN
        send(
            PriceUpdated(
                seller_id=request.seller_id,
                product_id=request.product_id,
                price=request.price,
                version=version,
                revision=revision,
                tid=tid,
            )
        )
        return Change.APPLIED

    @Transactional(type="RO")
    async def get(self, seller_id: int, product_id: int) -> dict[str, Any] | None:
        row = await session().get(ProductRecord, (seller_id, product_id))
        return None if row is None else as_row(row)

    @Outbound(ProductUpdated)
    @Transactional
    async def restore_versions(self) -> int:
        """``/reset``: every replaced product goes back to version "0" (replicas follow)."""
        replaced = (await session().scalars(select(ProductRecord).where(ProductRecord.version != "0"))).all()
        for row in replaced:
            data = ProductData.model_validate({**as_row(row), "version": "0"})
            await self._put(data, tid=None)
        return len(replaced)


async def _lock(seller_id: int, product_id: int) -> str | None:
    """Lock the product's row (requests for one product take turns from here); its version,
    ``None`` if there is no such product.

    Loaded through the session, as a read of the entity: a refused request read it too, and a
    read of a restored product begins its epoch (G10).
    """
    row = await session().get(ProductRecord, (seller_id, product_id), with_for_update=True)
    return None if row is None else row.version


async def _seen(tid: str, kind: str, request: BaseModel) -> Change | None:
    """``REPEATED`` or ``TAKEN`` if ``tid`` was used before, else ``None``."""
    table = ProductChange.__table__
    used = (await session().execute(select(table.c.kind, table.c.digest).where(table.c.tid == tid))).first()
    if used is None:
        return None
    return Change.REPEATED if tuple(used) == (kind, _digest(kind, request)) else Change.TAKEN


def _claim(tid: str, kind: str, request: BaseModel) -> Insert:
    """The INSERT that takes ``tid`` for ``request`` (returning it), unless it is taken."""
    return (
        insert(ProductChange.__table__)
        .values(tid=tid, kind=kind, digest=_digest(kind, request))
        .on_conflict_do_nothing(index_elements=["tid"])
        .returning(ProductChange.__table__.c.tid)
    )


async def _record(tid: str, kind: str, request: BaseModel) -> bool:
    """Take ``tid`` for ``request``; ``False`` if a concurrent request took it first.

    Read committed: the insert waits for a concurrent holder of ``tid`` to commit, then skips,
    and the caller's next read sees that holder's row.
    """
    taken = await session().execute(_claim(tid, kind, request))
    return taken.first() is not None


@Product.export  # the catalog is public: a cart checks that a product exists (Cart.known)
@Product.referenceable
class ProductRecord(Product.Model):
    __tablename__ = "products"
    seller_id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    sku: Mapped[str] = mapped_column(default="")
    category: Mapped[str] = mapped_column(default="")
    description: Mapped[str] = mapped_column(default="")
    price: Mapped[Decimal] = money_column()
    freight_value: Mapped[Decimal] = money_column()
    status: Mapped[str] = mapped_column(String(20), default="approved")
    version: Mapped[str] = mapped_column(String(200), default="0")
    active: Mapped[bool] = mapped_column(default=True)
    revision: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = timestamp_column()
    updated_at: Mapped[datetime] = timestamp_column()


class ProductChange(Product.Model):
    """The request each price update or replacement id named (its kind and a digest of its body)."""

    __tablename__ = "product_changes"
    tid: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = timestamp_column()
