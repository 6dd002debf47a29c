"""Add items.location and the private audit table.

Revision ID: w0002_audit
Revises: w0001_items
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "w0002_audit"
down_revision: str | Sequence[str] | None = "w0001_items"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("items", sa.Column("location", sa.String(), nullable=True), schema="warehouse")
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("note", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit")),
        schema="warehouse",
    )


def downgrade() -> None:
    op.drop_table("audit", schema="warehouse")
    op.drop_column("items", "location", schema="warehouse")
