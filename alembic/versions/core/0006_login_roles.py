"""Services and the housekeeping log in as their own roles, and the core enforces @Outbound.

- ``vms.login_secret``: the secret the login roles' passwords are derived from
  (``dbcore.logins``), readable by the administrator only.
- ``vms.outbound``: the event types each service declared with ``@Outbound``; the row-level
  security policy on ``vms.events`` lets a service insert only those. Filled here from the
  registered descriptors, and by every registration after.

Both tables are created only where missing: a catalog made by an older ``Core.install()`` and
adopted by stamping (``UNSTAMPED_REVISION``) already has them.

Copied from ``dbcore.catalog``, ``dbcore.logins`` and ``dbcore.eventlog`` as they were when this
revision was written: a revision stays what it is when the code moves on.

Revision ID: 0006_login_roles
Revises: 0005_trace_context
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006_login_roles"
down_revision: str | Sequence[str] | None = "0005_trace_context"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWN_EVENTS_AFTER = """
    CREATE POLICY own_events ON vms.events FOR INSERT
    WITH CHECK (producer IS NOT NULL AND vms.service_role(producer) = current_user
                AND EXISTS (SELECT 1 FROM vms.outbound o
                             WHERE o.service = producer AND o.event_type = type))
"""
OWN_EVENTS_BEFORE = """
    CREATE POLICY own_events ON vms.events FOR INSERT
    WITH CHECK (producer IS NOT NULL AND vms.service_role(producer) = current_user)
"""


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS vms.login_secret (
            id INTEGER NOT NULL,
            secret TEXT NOT NULL,
            CONSTRAINT pk_login_secret PRIMARY KEY (id),
            CONSTRAINT ck_login_secret_single_row CHECK (id = 1)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS vms.outbound (
            service VARCHAR(40) NOT NULL,
            event_type VARCHAR(200) NOT NULL,
            CONSTRAINT pk_outbound PRIMARY KEY (service, event_type),
            CONSTRAINT fk_outbound_service_services FOREIGN KEY (service)
                REFERENCES vms.services (name) ON DELETE CASCADE
        )
        """
    )
    op.execute(
        """
        INSERT INTO vms.outbound (service, event_type)
        SELECT DISTINCT s.name, e.event_type
          FROM vms.services s,
               jsonb_array_elements(s.descriptor -> 'outbound') AS o(declared),
               jsonb_array_elements_text(o.declared -> 'events') AS e(event_type)
        ON CONFLICT DO NOTHING
        """
    )
    op.execute("GRANT SELECT ON vms.outbound TO vms_services")
    op.execute("DROP POLICY IF EXISTS own_events ON vms.events")
    op.execute(OWN_EVENTS_AFTER)


def downgrade() -> None:
    op.execute("DROP POLICY IF EXISTS own_events ON vms.events")
    op.execute(OWN_EVENTS_BEFORE)
    op.execute("DROP TABLE IF EXISTS vms.outbound")
    op.execute("DROP TABLE IF EXISTS vms.login_secret")
