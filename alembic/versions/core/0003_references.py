"""The catalog of references and recovery (G9, G10), as ``Core.install()`` now creates it.

Until this revision the catalog was installed by the App at start, when a service declared
references (``dbcore.reference_catalog.install``); now it is part of the core. Everything is
created only if missing, so a database where an App installed it already upgrades cleanly. The
SQL is ``dbcore.reference_catalog`` rendered when this revision was written (its tables, then its
``install_sql``, then the recovery notification trigger): a revision stays what it is when the
code moves on. A test builds one database with ``Core.install()`` and one with the revisions and
compares their catalogs.

Revision ID: 0003_references
Revises: 0002_delivery_ack
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003_references"
down_revision: str | Sequence[str] | None = "0002_delivery_ack"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    r"""
CREATE TABLE IF NOT EXISTS vms.amnesia (
    id BIGSERIAL NOT NULL,
    service VARCHAR(40) NOT NULL,
    uri TEXT,
    recovery_id UUID NOT NULL,
    from_epoch INTEGER NOT NULL,
    to_epoch INTEGER NOT NULL,
    lo BIGINT NOT NULL,
    hi BIGINT,
    recovered_from TEXT[] DEFAULT '{}' NOT NULL,
    CONSTRAINT pk_amnesia PRIMARY KEY (id)
)
""",
    r"""CREATE INDEX IF NOT EXISTS ix_amnesia_service ON vms.amnesia (service)""",
    r"""CREATE INDEX IF NOT EXISTS ix_amnesia_uri ON vms.amnesia (uri)""",
    r"""
CREATE TABLE IF NOT EXISTS vms.backups (
    id UUID NOT NULL,
    service VARCHAR(40) NOT NULL,
    epoch INTEGER NOT NULL,
    t_backup BIGINT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    path TEXT NOT NULL,
    entities INTEGER NOT NULL,
    bytes BIGINT NOT NULL,
    CONSTRAINT pk_backups PRIMARY KEY (id)
)
""",
    r"""COMMENT ON COLUMN vms.backups.t_backup IS 'every version stamped <= it is in'""",
    r"""
CREATE TABLE IF NOT EXISTS vms.entities (
    uri TEXT NOT NULL,
    service VARCHAR(40) NOT NULL,
    entity VARCHAR(63) NOT NULL,
    key JSONB NOT NULL,
    t BIGINT NOT NULL,
    k INTEGER NOT NULL,
    d INTEGER DEFAULT '0' NOT NULL,
    deleted BOOLEAN DEFAULT 'false' NOT NULL,
    value JSONB,
    pending BOOLEAN DEFAULT 'false' NOT NULL,
    restored_by UUID,
    CONSTRAINT pk_entities PRIMARY KEY (uri)
)
""",
    r"""CREATE INDEX IF NOT EXISTS ix_entities_service ON vms.entities (service)""",
    r"""COMMENT ON COLUMN vms.entities.value IS 'a tombstone''s last value'""",
    r"""COMMENT ON COLUMN vms.entities.restored_by IS 'the recovery that restored it, until written'""",
    r"""
CREATE TABLE IF NOT EXISTS vms.entity_holders (
    uri TEXT NOT NULL,
    holder VARCHAR(40) NOT NULL,
    count INTEGER NOT NULL,
    CONSTRAINT pk_entity_holders PRIMARY KEY (uri, holder)
)
""",
    r"""
CREATE TABLE IF NOT EXISTS vms.recoveries (
    id UUID NOT NULL,
    service VARCHAR(40) NOT NULL,
    backup_id UUID NOT NULL,
    mode VARCHAR(12) NOT NULL,
    epoch INTEGER NOT NULL,
    backup_epoch INTEGER NOT NULL,
    t_backup BIGINT NOT NULL,
    t_restore BIGINT NOT NULL,
    expected TEXT[] NOT NULL,
    answered TEXT[] DEFAULT '{}' NOT NULL,
    status VARCHAR(12) NOT NULL,
    started_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    completed_at TIMESTAMP WITH TIME ZONE,
    CONSTRAINT pk_recoveries PRIMARY KEY (id)
)
""",
    r"""
CREATE TABLE IF NOT EXISTS vms.ref_services (
    service VARCHAR(40) NOT NULL,
    epoch INTEGER DEFAULT '1' NOT NULL,
    recovering VARCHAR(12),
    recovery_id UUID,
    CONSTRAINT pk_ref_services PRIMARY KEY (service)
)
""",
    r"""
CREATE TABLE IF NOT EXISTS vms.reference_columns (
    holder VARCHAR(40) NOT NULL,
    holder_table VARCHAR(63) NOT NULL,
    column_name VARCHAR(63) NOT NULL,
    target_service VARCHAR(40) NOT NULL,
    target_entity VARCHAR(63) NOT NULL,
    key_columns TEXT[] NOT NULL,
    CONSTRAINT pk_reference_columns PRIMARY KEY (holder, holder_table, column_name)
)
""",
    r"""
CREATE TABLE IF NOT EXISTS vms.referenceables (
    service VARCHAR(40) NOT NULL,
    entity VARCHAR(63) NOT NULL,
    key_columns TEXT[] NOT NULL,
    CONSTRAINT pk_referenceables PRIMARY KEY (service, entity)
)
""",
)

INSTALL_SQL = (
    r"""
CREATE OR REPLACE FUNCTION vms.ref_services_notify() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog AS $$
    BEGIN
        IF TG_OP = 'INSERT' OR NEW.recovering IS DISTINCT FROM OLD.recovering THEN
            PERFORM pg_notify('vms_recovery', NEW.service || E'\n' || coalesce(NEW.recovering, ''));
        END IF;
        RETURN NULL;
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_refuse_truncate() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog AS $$
    BEGIN
        RAISE EXCEPTION 'TRUNCATE of %.% is refused because the table is referenceable and '
                        'TRUNCATE would lose which of its entities are referenced; DELETE its '
                        'rows instead',
                        TG_TABLE_SCHEMA, TG_TABLE_NAME
              USING ERRCODE = 'VR405';
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.uri_part(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT replace(replace($1, '%', '%25'), '/', '%2F') $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_tick(p_service text) RETURNS bigint
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog AS $$
        SELECT nextval(format('vms.%I', 'clock__' || p_service)::regclass)
    $$
""",
    r"""
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
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_access(e vms.entities) RETURNS vms.entities
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE hi_ bigint;
    BEGIN
        IF e.pending THEN
            hi_ := vms.ref_tick(e.service);
            UPDATE vms.amnesia SET hi = hi_ WHERE uri = e.uri AND hi IS NULL;
            e.pending := false;
        END IF;
        RETURN e;
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_service(p_service text, p_write boolean) RETURNS vms.ref_services
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE s vms.ref_services;
    BEGIN
        SELECT * INTO s FROM vms.ref_services WHERE service = p_service;
        IF s.recovering = 'consistency' AND p_write THEN
            RAISE EXCEPTION 'service % is recovering (consistency mode): it serves again when every '
                'referencing service has answered or the recovery times out', p_service
                USING ERRCODE = 'VR503';
        END IF;
        RETURN s;
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_forget(p_uri text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE svc text; hi_ bigint;
    BEGIN
        SELECT service INTO svc FROM vms.entities WHERE uri = p_uri;
        IF NOT FOUND THEN RETURN; END IF;
        IF EXISTS (SELECT 1 FROM vms.amnesia WHERE uri = p_uri AND hi IS NULL) THEN
            hi_ := vms.ref_tick(svc);
            UPDATE vms.amnesia SET hi = hi_ WHERE uri = p_uri AND hi IS NULL;
        END IF;
        DELETE FROM vms.entities WHERE uri = p_uri;
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_collect(p_uri text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM vms.entities e JOIN vms.ref_services s ON s.service = e.service
                    WHERE e.uri = p_uri AND e.deleted AND e.d <= 0 AND s.recovering IS NULL) THEN
            PERFORM vms.ref_forget(p_uri);
        END IF;
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_written(p_service text, p_entity text, p_uri text, p_key jsonb)
    RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services;
    BEGIN
        IF current_setting('vms.merging', true) = 'on' THEN RETURN; END IF;  -- recovery sets t, k
        s := vms.ref_service(p_service, true);
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        IF NOT FOUND THEN
            -- Holders may still count references to this URI (lost ones): d starts from them.
            INSERT INTO vms.entities (uri, service, entity, key, t, k, d)
            VALUES (p_uri, p_service, p_entity, p_key, vms.ref_tick(p_service), s.epoch,
                    (SELECT coalesce(sum(count), 0) FROM vms.entity_holders WHERE uri = p_uri));
            RETURN;
        END IF;
        e := vms.ref_access(e);
        UPDATE vms.entities SET t = vms.ref_tick(p_service), k = s.epoch, pending = false,
               deleted = false, value = NULL, restored_by = NULL
         WHERE uri = p_uri;
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_deleted(p_service text, p_uri text, p_value jsonb)
    RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services;
    BEGIN
        IF current_setting('vms.merging', true) = 'on' THEN RETURN; END IF;
        s := vms.ref_service(p_service, true);
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        IF NOT FOUND THEN RETURN; END IF;
        e := vms.ref_access(e);
        IF e.d > 0 OR s.recovering IS NOT NULL THEN  -- keep a tombstone: last value, same (t, k)
            UPDATE vms.entities SET deleted = true, value = p_value, k = e.k, pending = false,
                   restored_by = NULL WHERE uri = p_uri;
        ELSE
            PERFORM vms.ref_forget(p_uri);
            DELETE FROM vms.entity_holders WHERE uri = p_uri;
        END IF;
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.ref_copy(e vms.entities, p_columns text[]) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE keys text[]; row_ jsonb;
    BEGIN
        SELECT key_columns INTO keys FROM vms.referenceables
         WHERE service = e.service AND entity = e.entity;
        IF e.deleted THEN
            row_ := e.value;
        ELSE
            EXECUTE format('SELECT to_jsonb(x) FROM %1$I.%2$I x, '
                           'jsonb_populate_record(NULL::%1$I.%2$I, $1) k WHERE %3$s',
                           e.service, e.entity,
                           (SELECT string_agg(format('x.%1$I = k.%1$I', c), ' AND ') FROM unnest(keys) c))
               INTO row_ USING e.key;
        END IF;
        IF p_columns IS NULL OR row_ IS NULL THEN RETURN row_; END IF;
        RETURN (SELECT jsonb_object_agg(j.key, j.value) FROM jsonb_each(row_) j
                 WHERE j.key = ANY(p_columns || keys));
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.get_reference(
        p_uri text, p_count boolean, p_copy boolean, p_columns text[], p_holder text)
    RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services; holder_ text := vms.ref_caller(p_holder);
    BEGIN
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no referenceable entity %', p_uri USING ERRCODE = 'VR404';
        END IF;
        s := vms.ref_service(e.service, true);
        IF e.deleted AND p_count THEN
            RAISE EXCEPTION 'entity % was deleted', p_uri USING ERRCODE = 'VR410';
        END IF;
        IF e.pending THEN  -- the first access stamps a new version, in the new epoch
            e := vms.ref_access(e);
            e.t := vms.ref_tick(e.service);
            e.k := s.epoch;
        END IF;
        IF p_count THEN
            e.d := e.d + 1;
            INSERT INTO vms.entity_holders AS h (uri, holder, count) VALUES (p_uri, holder_, 1)
            ON CONFLICT (uri, holder) DO UPDATE SET count = h.count + 1;
        END IF;
        UPDATE vms.entities SET t = e.t, k = e.k, d = e.d, pending = e.pending WHERE uri = p_uri;
        RETURN jsonb_build_object('uri', e.uri, 't', e.t, 'k', e.k, 'deleted', e.deleted,
                                  'copy', CASE WHEN p_copy THEN vms.ref_copy(e, p_columns) END);
    END $$
""",
    r"""
CREATE OR REPLACE FUNCTION vms.delete_reference(p_uri text, p_holder text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; exists_ boolean; holder_ text := vms.ref_caller(p_holder);
    BEGIN
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        exists_ := FOUND;
        -- Only what this holder counted can be released: after a restore its count may be
        -- stale, and a stale decrement must not free another holder's reference. (A count may
        -- outlive its entity: a reference lost with it is still held until given back.)
        UPDATE vms.entity_holders SET count = count - 1
         WHERE uri = p_uri AND holder = holder_ AND count > 0;
        IF NOT FOUND THEN RETURN false; END IF;
        DELETE FROM vms.entity_holders WHERE uri = p_uri AND holder = holder_ AND count <= 0;
        IF exists_ THEN
            UPDATE vms.entities SET d = greatest(d - 1, 0) WHERE uri = p_uri;
            PERFORM vms.ref_collect(p_uri);
        END IF;
        RETURN true;
    END $$
""",
    r"""REVOKE ALL ON FUNCTION vms.ref_tick(text) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.ref_access(vms.entities) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.ref_service(text, boolean) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.ref_forget(text) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.ref_collect(text) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.ref_written(text, text, text, jsonb) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.ref_deleted(text, text, jsonb) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.ref_copy(vms.entities, text[]) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.get_reference(text, boolean, boolean, text[], text) FROM PUBLIC""",
    r"""REVOKE ALL ON FUNCTION vms.delete_reference(text, text) FROM PUBLIC""",
    r"""
GRANT SELECT ON vms.referenceables, vms.reference_columns TO "vms_services"
""",
    r"""
GRANT EXECUTE ON FUNCTION vms.get_reference(text, boolean, boolean, text[], text) TO "vms_services"
""",
    r"""
GRANT EXECUTE ON FUNCTION vms.delete_reference(text, text) TO "vms_services"
""",
)

NOTIFY_TRIGGER = r"""
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'ref_services_notify'
                   AND tgrelid = CAST('vms.ref_services' AS regclass)) THEN
        CREATE TRIGGER ref_services_notify AFTER INSERT OR UPDATE ON vms.ref_services
        FOR EACH ROW EXECUTE FUNCTION vms.ref_services_notify();
    END IF;
END $$
"""

#: Dropped on downgrade, with every function of the catalog (those of 0001 and 0002 stay).
CATALOG_TABLES = (
    "referenceables",
    "reference_columns",
    "ref_services",
    "recoveries",
    "entity_holders",
    "entities",
    "backups",
    "amnesia",
)


def upgrade() -> None:
    for statement in (*TABLES, *INSTALL_SQL, NOTIFY_TRIGGER):
        op.execute(statement)


def downgrade() -> None:
    for table in CATALOG_TABLES:
        op.execute(f"DROP TABLE IF EXISTS vms.{table} CASCADE")
    op.execute(
        """
        DO $$ DECLARE f regprocedure;
        BEGIN
            FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
                      WHERE p.pronamespace = 'vms'::regnamespace
                        AND (p.proname LIKE 'ref\\_%' OR p.proname IN
                             ('uri_part', 'get_reference', 'delete_reference'))
            LOOP
                EXECUTE format('DROP FUNCTION %s CASCADE', f);
            END LOOP;
        END $$
        """
    )
