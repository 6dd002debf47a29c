"""Reads begin epochs (recovery paper §3.3, Definition 2): ``vms.ref_read``, merge conflicts.

The first read of a restored entity (by its owner, by another service's ``@Query``, or a holder
taking a copy through ``vms.get_reference``) closes its amnesia interval and begins its new epoch;
a later merge keeps the value that was read and records the holder's copy in
``vms.merge_conflicts``. The SQL is ``dbcore.reference_catalog`` as it was when this revision was
written (a test compares ``Core.install()`` with the revisions).

Revision ID: 0006_reads_begin_epochs
Revises: 0005_trace_context
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006_reads_begin_epochs"
# Written beside 0004_service_roles, on another branch: re-point to it when both are merged.
down_revision: str | Sequence[str] | None = "0005_trace_context"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = (
    r"""
CREATE TABLE IF NOT EXISTS vms.merge_conflicts (
	recovery_id UUID NOT NULL,
	uri TEXT NOT NULL,
	holder VARCHAR(40) NOT NULL,
	service VARCHAR(40) NOT NULL,
	t BIGINT NOT NULL,
	k INTEGER NOT NULL,
	copy JSONB NOT NULL,
	at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	CONSTRAINT pk_merge_conflicts PRIMARY KEY (recovery_id, uri, holder)
)
""",
    r"""
CREATE INDEX IF NOT EXISTS ix_entities_restored ON vms.entities (service) WHERE restored_by IS NOT NULL
""",
    r"""COMMENT ON COLUMN vms.entities.restored_by IS 'the recovery that restored it, until written or read'""",
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
        -- A copy is a read of the entity's state: a merge must not overwrite what it saw.
        UPDATE vms.entities SET t = e.t, k = e.k, d = e.d, pending = e.pending,
               restored_by = CASE WHEN p_copy THEN NULL ELSE e.restored_by END
         WHERE uri = p_uri;
        RETURN jsonb_build_object('uri', e.uri, 't', e.t, 'k', e.k, 'deleted', e.deleted,
                                  'copy', CASE WHEN p_copy THEN vms.ref_copy(e, p_columns) END);
    END $$

""",
    r"""
    CREATE OR REPLACE FUNCTION vms.ref_read(p_service text, p_entity text, p_uris text[])
    RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services;
    BEGIN
        s := vms.ref_service(p_service, true);
        FOR e IN SELECT * FROM vms.entities
                  WHERE service = p_service AND restored_by IS NOT NULL
                    AND (uri = ANY(p_uris) OR (p_uris IS NULL AND entity = p_entity))
                  ORDER BY uri FOR UPDATE LOOP
            IF e.pending THEN
                e := vms.ref_access(e);
                UPDATE vms.entities SET t = vms.ref_tick(p_service), k = s.epoch, pending = false,
                       restored_by = NULL WHERE uri = e.uri;
            ELSE
                UPDATE vms.entities SET restored_by = NULL WHERE uri = e.uri;
            END IF;
        END LOOP;
        RETURN EXISTS (SELECT 1 FROM vms.entities WHERE service = p_service AND restored_by IS NOT NULL);
    END $$

""",
    r"""
REVOKE ALL ON FUNCTION vms.ref_read(text, text, text[]) FROM PUBLIC
""",
    r"""
GRANT EXECUTE ON FUNCTION vms.ref_read(text, text, text[]) TO "vms_services"
""",
)

# vms.get_reference as 0003_references made it (a copy was not yet a read).
DOWNGRADE = (
    "DROP FUNCTION IF EXISTS vms.ref_read(text, text, text[])",
    "DROP TABLE IF EXISTS vms.merge_conflicts",
    "DROP INDEX IF EXISTS vms.ix_entities_restored",
    r"""COMMENT ON COLUMN vms.entities.restored_by IS 'the recovery that restored it, until written'""",
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
)


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
