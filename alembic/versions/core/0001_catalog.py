"""The core catalog, as ``Core.install()`` creates it.

Tables from ``dbcore.catalog.metadata`` (with the event log's and the leases' tables), then the SQL
that ``create_all`` does not express (``dbcore.eventlog.install_sql`` and ``dbcore.leases.install_sql``),
copied here so this revision stays what it is when those modules move on. A test builds one
database with ``Core.install()`` and one with this revision and compares their catalogs.

Revision ID: 0001_catalog
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_catalog"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "vms"


class _Xid8(sa.types.UserDefinedType[int]):
    """Postgres ``xid8``, as ``dbcore.eventlog.Xid8`` declares it."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


def _jsonb() -> postgresql.JSONB:
    return postgresql.JSONB(astext_type=sa.Text())


def _now() -> sa.TextClause:
    return sa.text("now()")


# Roles belong to the cluster, so two databases on one server may race to create it.
CREATE_GROUP_ROLE = """
DO $$ BEGIN
    CREATE ROLE "vms_services" NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$
"""

# dbcore.eventlog.install_sql, then dbcore.leases.install_sql.
INSTALL_SQL = (
    """
    CREATE OR REPLACE FUNCTION vms.fan_out() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, vms AS $$
    DECLARE
        targets text;
        correlations text;
    BEGIN
        WITH inserted AS (
            INSERT INTO vms.deliveries (subscriber, position, xid, event_type, key)
            SELECT s.service, n.position, n.xid, n.type, n.key
              FROM new_events n JOIN vms.subscriptions s ON s.event_type = n.type
            RETURNING subscriber
        )
        SELECT string_agg(DISTINCT subscriber, ',') INTO targets FROM inserted;
        -- The second line names the correlations, so outcome waiters look up only their own;
        -- '*' (look at all) when the list would not fit in a notification.
        SELECT string_agg(DISTINCT correlation_id, ',') INTO correlations FROM new_events;
        IF length(correlations) > 7000 THEN
            correlations := '*';
        END IF;
        IF targets IS NOT NULL OR correlations IS NOT NULL THEN
            PERFORM pg_notify('vms_events',
                              coalesce(targets, '') || E'\n' || coalesce(correlations, ''));
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER events_fan_out AFTER INSERT ON vms.events
    REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION vms.fan_out()
    """,
    "GRANT USAGE ON SCHEMA vms TO vms_services",
    "GRANT INSERT ON vms.events TO vms_services",
    "GRANT USAGE ON SEQUENCE vms.events_position_seq TO vms_services",
    "ALTER TABLE vms.events ENABLE ROW LEVEL SECURITY",
    """
    CREATE POLICY own_events ON vms.events FOR INSERT
    WITH CHECK (producer IS NOT NULL AND 'vms_' || producer = current_user)
    """,
    "GRANT SELECT, DELETE ON vms.deliveries TO vms_services",
    "ALTER TABLE vms.deliveries ENABLE ROW LEVEL SECURITY",
    """
    CREATE POLICY own_deliveries ON vms.deliveries FOR ALL
    USING ('vms_' || subscriber = current_user)
    """,
    "CREATE TABLE vms.clock (id boolean PRIMARY KEY DEFAULT true CHECK (id), "
    "offset_by interval NOT NULL DEFAULT '0')",
    "INSERT INTO vms.clock (id) VALUES (true)",
    """
    CREATE OR REPLACE FUNCTION vms.now() RETURNS timestamptz
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
        SELECT now() + coalesce((SELECT offset_by FROM vms.clock), interval '0')
    $$
    """,
    "GRANT EXECUTE ON FUNCTION vms.now() TO vms_services",
    "CREATE TABLE vms.lease_keys (service varchar(40) NOT NULL, "
    "entity varchar(63) NOT NULL, key_text text NOT NULL, grants bigint NOT NULL, "
    "PRIMARY KEY (service, entity, key_text))",
    "GRANT SELECT, INSERT, UPDATE ON vms.lease_keys TO vms_services",
    "ALTER TABLE vms.lease_keys ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY lease_keys_owner ON vms.lease_keys FOR ALL USING ('vms_' || service = current_user)",
    "GRANT SELECT, INSERT, UPDATE ON vms.leases TO vms_services",
    "ALTER TABLE vms.leases ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY leases_read ON vms.leases FOR SELECT USING (true)",
    "CREATE POLICY leases_insert ON vms.leases FOR INSERT WITH CHECK ('vms_' || service = current_user)",
    "CREATE POLICY leases_update ON vms.leases FOR UPDATE USING ('vms_' || service = current_user)",
)


def upgrade() -> None:
    op.execute(CREATE_GROUP_ROLE)
    op.create_table(
        "services",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("schema_name", sa.String(length=63), nullable=False),
        sa.Column("role_name", sa.String(length=63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("descriptor", _jsonb(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_services"),
        sa.UniqueConstraint("role_name", name="uq_services_role_name"),
        sa.UniqueConstraint("schema_name", name="uq_services_schema_name"),
        schema=SCHEMA,
    )
    op.create_table(
        "service_versions",
        sa.Column("service", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("descriptor", _jsonb(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["service"],
            ["vms.services.name"],
            name="fk_service_versions_service_services",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("service", "version", name="pk_service_versions"),
        schema=SCHEMA,
    )
    op.create_table(
        "event_types",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_field", sa.String(length=200), nullable=True),
        sa.Column("json_schema", _jsonb(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_event_types"),
        schema=SCHEMA,
    )
    op.create_table(
        "subscriptions",
        sa.Column("service", sa.String(length=40), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("handler", sa.String(length=200), nullable=False),
        sa.Column("precedence", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["service"], ["vms.services.name"], name="fk_subscriptions_service_services", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("service", "event_type", name="pk_subscriptions"),
        schema=SCHEMA,
    )
    op.create_table(
        "owned_tables",
        sa.Column("schema_name", sa.String(length=63), nullable=False),
        sa.Column("table_name", sa.String(length=63), nullable=False),
        sa.Column("service", sa.String(length=40), nullable=False),
        sa.Column("entity", sa.String(length=200), nullable=False),
        sa.Column("exported", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["service"], ["vms.services.name"], name="fk_owned_tables_service_services", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("schema_name", "table_name", name="pk_owned_tables"),
        schema=SCHEMA,
    )
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("xid", _Xid8(), server_default=sa.text("pg_current_xact_id()"), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("type", sa.String(length=200), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("payload", _jsonb(), nullable=False),
        sa.Column("producer", sa.String(length=40), nullable=True),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column("causation_id", sa.UUID(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("position", name="pk_events"),
        sa.UniqueConstraint("id", name="uq_events_id"),
        schema=SCHEMA,
    )
    op.create_index("ix_events_xid_position", "events", ["xid", "position"], schema=SCHEMA)
    op.create_index(
        "ix_events_correlation_id",
        "events",
        ["correlation_id"],
        schema=SCHEMA,
        postgresql_where=sa.text("correlation_id IS NOT NULL"),
    )
    op.create_table(
        "deliveries",
        sa.Column("subscriber", sa.String(length=40), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("xid", _Xid8(), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("available_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("claim", sa.UUID(), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("subscriber", "position", name="pk_deliveries"),
        schema=SCHEMA,
    )
    op.create_index("ix_deliveries_order", "deliveries", ["subscriber", "xid", "position"], schema=SCHEMA)
    op.create_index(
        "ix_deliveries_key", "deliveries", ["subscriber", "key", "xid", "position"], schema=SCHEMA
    )
    op.create_index(
        "ix_deliveries_type", "deliveries", ["subscriber", "event_type", "xid", "position"], schema=SCHEMA
    )
    op.create_table(
        "relay_cursors",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("xid", _Xid8(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_relay_cursors"),
        schema=SCHEMA,
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("subscriber", sa.String(length=40), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=True),
        sa.Column("xid", _Xid8(), nullable=True),
        sa.Column("event_id", sa.UUID(), nullable=True),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("payload", _jsonb(), nullable=True),
        sa.Column(
            "raw", sa.Text(), nullable=True, comment="undecodable input as received, when there is no payload"
        ),
        sa.Column("source", sa.String(length=200), server_default="db", nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("blocking", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
        schema=SCHEMA,
    )
    op.create_table(
        "leases",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("service", sa.String(length=40), nullable=False),
        sa.Column("function", sa.String(length=200), nullable=False),
        sa.Column("entity", sa.String(length=63), nullable=False),
        sa.Column("key", _jsonb(), nullable=False),
        sa.Column("key_text", sa.Text(), nullable=False),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("holder", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_leases"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_leases_active",
        "leases",
        ["service", "entity", "key_text"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'active'"),
    )
    for statement in INSTALL_SQL:
        op.execute(statement)


def downgrade() -> None:
    # The schema stays (it holds this history's version table), and so does the group role: roles
    # belong to the cluster, and other databases on it may use it.
    op.execute("DROP FUNCTION vms.now()")
    op.drop_table("clock", schema=SCHEMA)
    op.drop_table("lease_keys", schema=SCHEMA)
    for table in (
        "leases",
        "dead_letters",
        "relay_cursors",
        "deliveries",
        "events",
        "owned_tables",
        "subscriptions",
        "event_types",
        "service_versions",
        "services",
    ):
        op.drop_table(table, schema=SCHEMA)
    op.execute("DROP FUNCTION vms.fan_out()")
    op.execute("REVOKE USAGE ON SCHEMA vms FROM vms_services")
