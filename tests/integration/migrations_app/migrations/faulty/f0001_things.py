"""Create things, with one row.

Revision ID: f0001_things
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f0001_things"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    things = op.create_table(
        "things",
        sa.Column("id", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_things")),
        schema="faulty",
    )
    op.bulk_insert(things, [{"id": "seed"}])


def downgrade() -> None:
    op.drop_table("things", schema="faulty")
