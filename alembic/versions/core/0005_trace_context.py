"""The sender's W3C trace context stored with each event (``vms.events.trace_context``).

Written only while tracing is on (OpenTelemetry, ``vmsdb[otel]``); a handler's span is then a
child of the span that sent its event. Adding a nullable column without a default rewrites
nothing: existing events simply have none.

Revision ID: 0005_trace_context
Revises: 0004_service_roles
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_trace_context"
down_revision: str | Sequence[str] | None = "0004_service_roles"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE vms.events ADD COLUMN IF NOT EXISTS trace_context TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE vms.events DROP COLUMN IF EXISTS trace_context")
