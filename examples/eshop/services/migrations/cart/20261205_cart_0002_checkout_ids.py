"""checkout ids

``checkout_ids``: the customer each checkout id (``instanceId``) belongs to, so that an id used
by one customer is refused to another.

Revision ID: cart_0002
Revises: cart_0001
Create Date: 2026-12-05 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "cart_0002"
down_revision: str | Sequence[str] | None = "cart_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "checkout_ids",
        sa.Column("tid", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("tid", name=op.f("pk_checkout_ids")),
        schema="cart",
    )


def downgrade() -> None:
    op.drop_table("checkout_ids", schema="cart")
