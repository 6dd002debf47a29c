"""product changes

``product_changes``: the request (kind and body digest) each price update or replacement id
named, so that a repeat is answered without being applied again and another request under a
used id is refused.

Revision ID: product_0002
Revises: product_0001
Create Date: 2026-12-05 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "product_0002"
down_revision: str | Sequence[str] | None = "product_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "product_changes",
        sa.Column("tid", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("tid", name=op.f("pk_product_changes")),
        schema="product",
    )


def downgrade() -> None:
    op.drop_table("product_changes", schema="product")
