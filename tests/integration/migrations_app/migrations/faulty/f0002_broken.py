"""Create extras, then add a NOT NULL column without a default: fails, since things has a row.

Revision ID: f0002_broken
Revises: f0001_things
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f0002_broken"
down_revision: str | Sequence[str] | None = "f0001_things"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "extras",
        sa.Column("id", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_extras")),
        schema="faulty",
    )
    op.add_column("things", sa.Column("label", sa.String(), nullable=True), schema="faulty")
    op.add_column("things", sa.Column("weight", sa.Integer(), nullable=False), schema="faulty")


def downgrade() -> None:
    op.drop_column("things", "weight", schema="faulty")
    op.drop_column("things", "label", schema="faulty")
    op.drop_table("extras", schema="faulty")
