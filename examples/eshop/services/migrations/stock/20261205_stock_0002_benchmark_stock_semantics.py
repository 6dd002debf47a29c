"""benchmark stock semantics

``qty_available`` becomes what is on hand (sold units leave it; reserved ones stay in it until
paid), and the new ``qty_free = qty_available - qty_reserved`` is what add-to-cart leases. Rows
written under the old meaning (reservations had left ``qty_available``) are converted.

Revision ID: stock_0002
Revises: stock_0001
Create Date: 2026-12-05 07:45:35.462012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "stock_0002"
down_revision: str | Sequence[str] | None = "stock_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "stock_items",
        sa.Column("qty_free", sa.Integer(), nullable=False, server_default="0"),
        schema="stock",
    )
    op.execute(
        "UPDATE stock.stock_items SET qty_free = qty_available, qty_available = qty_available + qty_reserved"
    )
    op.alter_column("stock_items", "qty_free", server_default=None, schema="stock")
    op.create_check_constraint(
        op.f("ck_stock_items_reserved_within_available"),
        "stock_items",
        "qty_reserved <= qty_available",
        schema="stock",
    )
    op.create_check_constraint(
        op.f("ck_stock_items_free_not_negative"), "stock_items", "qty_free >= 0", schema="stock"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_stock_items_free_not_negative"), "stock_items", schema="stock")
    op.drop_constraint(op.f("ck_stock_items_reserved_within_available"), "stock_items", schema="stock")
    op.execute("UPDATE stock.stock_items SET qty_available = qty_free")
    op.drop_column("stock_items", "qty_free", schema="stock")
