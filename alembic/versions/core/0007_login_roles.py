"""Services and the housekeeping log in as their own roles, and the core enforces @Outbound.

- ``vms.login_secret``: the secret the login roles' passwords are derived from
  (``dbcore.logins``), readable by the administrator only.
- ``vms.outbound``: the event types each service declared with ``@Outbound``; the row-level
  security policy on ``vms.events`` lets a service insert only those, and the fan-out
  (``vms.undeclared``) delivers no event of a local service's undeclared type. Filled here from
  the registered descriptors, and by every registration after.
- ``vms.ref_caller``: a service logged in as its own role has no SET ROLE setting ('none'); its
  session user is the caller. The core role names a holder like the administrator.

Both tables are created only where missing: a catalog made by an older ``Core.install()`` and
adopted by stamping (``UNSTAMPED_REVISION``) already has them.

Copied from ``dbcore.catalog``, ``dbcore.logins`` and ``dbcore.eventlog`` as they were when this
revision was written: a revision stays what it is when the code moves on.

Revision ID: 0007_login_roles
Revises: 0006_reads_begin_epochs
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007_login_roles"
down_revision: str | Sequence[str] | None = "0006_reads_begin_epochs"
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

UNDECLARED_FUNCTION = r"""
    CREATE OR REPLACE FUNCTION vms.undeclared(p_producer text, p_type text, p_origin text)
    RETURNS boolean LANGUAGE sql STABLE AS $$
        SELECT p_producer IS NOT NULL AND p_origin IS NULL AND p_type NOT LIKE 'vms.%'
           AND EXISTS (SELECT 1 FROM vms.services WHERE name = p_producer)
           AND NOT EXISTS (SELECT 1 FROM vms.outbound WHERE service = p_producer AND event_type = p_type)
    $$
"""

FAN_OUT_AFTER = r"""
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
             WHERE NOT vms.undeclared(n.producer, n.type, n.origin)
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
                              coalesce(targets, '') || E'
' || coalesce(correlations, ''));
        END IF;
        RETURN NULL;
    END $$
    """

FAN_OUT_BEFORE = r"""
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
                              coalesce(targets, '') || E'
' || coalesce(correlations, ''));
        END IF;
        RETURN NULL;
    END $$
    """

# Logged in directly, a service's SET ROLE setting is 'none': its login role is the caller.
REF_CALLER_AFTER = r"""
    CREATE OR REPLACE FUNCTION vms.ref_caller(p_holder text) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
    DECLARE r text := current_setting('role');
    BEGIN
        IF r = 'none' THEN r := session_user; END IF;
        IF r LIKE 'vms\_%' AND r NOT IN ('vms_services', 'vms_core') THEN
            RETURN substr(r, 5);
        END IF;
        IF p_holder IS NULL THEN
            RAISE EXCEPTION 'a reference needs a holder service' USING ERRCODE = '22023';
        END IF;
        RETURN p_holder;
    END $$
"""

REF_CALLER_BEFORE = r"""
    CREATE OR REPLACE FUNCTION vms.ref_caller(p_holder text) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
    DECLARE r text := current_setting('role');
    BEGIN
        IF r LIKE 'vms\_%' AND r <> 'vms_services' THEN RETURN substr(r, 5); END IF;
        IF p_holder IS NULL THEN
            RAISE EXCEPTION 'a reference needs a holder service' USING ERRCODE = '22023';
        END IF;
        RETURN p_holder;
    END $$
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
    op.execute(UNDECLARED_FUNCTION)
    op.execute(FAN_OUT_AFTER)
    op.execute(REF_CALLER_AFTER)


def downgrade() -> None:
    op.execute(REF_CALLER_BEFORE)
    op.execute(FAN_OUT_BEFORE)
    op.execute("DROP FUNCTION IF EXISTS vms.undeclared(text, text, text)")
    op.execute("DROP POLICY IF EXISTS own_events ON vms.events")
    op.execute(OWN_EVENTS_BEFORE)
    op.execute("DROP TABLE IF EXISTS vms.outbound")
    op.execute("DROP TABLE IF EXISTS vms.login_secret")
