"""Create items.

Revision ID: w0001_items
Revises:
Create Date: 2026-11-21
"""

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "w0001_items"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("qty", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
        schema="warehouse",
    )
    # The test of concurrent migrations widens the window in which two processes would collide.
    delay = float(os.environ.get("VMSDB_TEST_MIGRATION_DELAY", "0"))
    if delay:
        op.execute(sa.text("SELECT pg_sleep(:delay)").bindparams(delay=delay))


def downgrade() -> None:
    op.drop_table("items", schema="warehouse")
