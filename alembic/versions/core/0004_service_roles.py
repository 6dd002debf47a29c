"""The naming rule of service roles in one place: ``vms.service_role(service)``, used by every
row-level security policy instead of a ``'vms_' ||`` of its own.

Copied from ``dbcore.catalog.SERVICE_ROLE_FUNCTION`` and the policies of ``dbcore.eventlog`` and
``dbcore.leases`` as they were when this revision was written: a revision stays what it is when
the code moves on.

Revision ID: 0004_service_roles
Revises: 0003_references
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_service_roles"
down_revision: str | Sequence[str] | None = "0003_references"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SERVICE_ROLE_FUNCTION = """
    CREATE OR REPLACE FUNCTION vms.service_role(p_service text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 'vms_' || p_service $$
"""

#: (table, policy, the policy's definition after this revision, before it)
POLICIES = (
    (
        "vms.events",
        "own_events",
        "FOR INSERT WITH CHECK (producer IS NOT NULL AND vms.service_role(producer) = current_user)",
        "FOR INSERT WITH CHECK (producer IS NOT NULL AND 'vms_' || producer = current_user)",
    ),
    (
        "vms.deliveries",
        "own_deliveries",
        "FOR ALL USING (vms.service_role(subscriber) = current_user)",
        "FOR ALL USING ('vms_' || subscriber = current_user)",
    ),
    (
        "vms.lease_keys",
        "lease_keys_owner",
        "FOR ALL USING (vms.service_role(service) = current_user)",
        "FOR ALL USING ('vms_' || service = current_user)",
    ),
    (
        "vms.leases",
        "leases_insert",
        "FOR INSERT WITH CHECK (vms.service_role(service) = current_user)",
        "FOR INSERT WITH CHECK ('vms_' || service = current_user)",
    ),
    (
        "vms.leases",
        "leases_update",
        "FOR UPDATE USING (vms.service_role(service) = current_user)",
        "FOR UPDATE USING ('vms_' || service = current_user)",
    ),
)


def _policies(which: int) -> None:
    for table, name, *definitions in POLICIES:
        op.execute(f"DROP POLICY IF EXISTS {name} ON {table}")
        op.execute(f"CREATE POLICY {name} ON {table} {definitions[which]}")


def upgrade() -> None:
    op.execute(SERVICE_ROLE_FUNCTION)
    op.execute("GRANT EXECUTE ON FUNCTION vms.service_role(text) TO vms_services")
    _policies(0)


def downgrade() -> None:
    _policies(1)
    op.execute("DROP FUNCTION IF EXISTS vms.service_role(text)")
