"""Product: the catalogue of every seller; source of PriceUpdated and ProductUpdated.

Every change raises the product's ``revision``; events carry it, so replicas apply a change only
if it is newer than what they hold. Versions name what a cart item refers to: a price update
applies only to the current version, a replacement installs a new one.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import String, select, update
from sqlalchemy.orm import Mapped, mapped_column

from framework import Outbound, Service, Transactional, send, session
from vmsdb_eshop.events import PriceUpdated, ProductUpdated
from vmsdb_eshop.schemas import ProductData
from vmsdb_eshop.services.common import as_row, money_column, now, rows, timestamp_column

__all__ = ["DELETED", "Product", "ProductRecord"]

#: The product status that withdraws it from sale (a replacement may carry it).
DELETED = "deleted"


class Product(Service, name="product"):
    @Outbound(ProductUpdated)
    @Transactional
    async def ingest(self, products: list[ProductData]) -> int:
        """Insert or replace products; the cart's replica and the stock hear of each one."""
        for data in products:
            await self._put(data, tid=None)
        return len(products)

    @Outbound(ProductUpdated)
    @Transactional
    async def replace(self, data: ProductData, tid: str) -> None:
        """UPDATE_PRODUCT: overwrite the product with a new version (``tid``)."""
        await self._put(data, tid=tid)

    async def _put(self, data: ProductData, tid: str | None) -> None:
        s = session()
        row = await s.get(ProductRecord, (data.seller_id, data.product_id), with_for_update=True)
        if row is None:
            row = ProductRecord(seller_id=data.seller_id, product_id=data.product_id, revision=0)
            s.add(row)
        for name, value in data.model_dump().items():
            setattr(row, name, value)
        # A replacement with status "deleted" withdraws the product: carts drop it (DELETED).
        row.active = data.status != DELETED
        row.revision += 1
        row.updated_at = now()
        send(
            ProductUpdated(
                seller_id=data.seller_id,
                product_id=data.product_id,
                product=data,
                active=row.active,
                revision=row.revision,
                tid=tid,
            )
        )

    @Outbound(PriceUpdated)
    @Transactional
    async def update_price(
        self, seller_id: int, product_id: int, price: Decimal, version: str, tid: str
    ) -> bool:
        """PRICE_UPDATE: set the price if ``version`` is current; always publish PriceUpdated.

        Returns ``False`` for an unknown product (and publishes nothing).
        """
        changed = await rows(
            update(ProductRecord)
            .where(
                ProductRecord.seller_id == seller_id,
                ProductRecord.product_id == product_id,
                ProductRecord.version == version,
            )
            .values(price=price, revision=ProductRecord.revision + 1, updated_at=now())
            .returning(ProductRecord.revision)
        )
        if changed:
            revision = changed[0]["revision"]
        else:
            current = await session().get(ProductRecord, (seller_id, product_id))
            if current is None:
                return False
            revision = current.revision
        send(
            PriceUpdated(
                seller_id=seller_id,
                product_id=product_id,
                price=price,
                version=version,
                revision=revision,
                tid=tid,
            )
        )
        return True

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
