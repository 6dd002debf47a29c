"""Batched references, and notifications that name the event types of each correlation.

- ``vms.get_references(uris, count, copies, holder)``: many references in one statement, each
  refusal (no such entity, a tombstone) an answer in its place rather than an error, so the
  caller's transaction goes on without a savepoint; the entities are locked in URI order, so two
  batches cannot deadlock. ``vms.ref_take`` is the body it shares with ``vms.get_reference``
  (which still raises a refusal); services may not call it (it trusts the holder it is given).
- ``vms.fan_out``: the notification's second line names each correlation with the event types
  committed in it (``<correlation>=<type>|<type>,...``, names escaped by ``vms.notify_part``),
  so that an outcome waiter is looked up only when a type it awaits committed.

Copied from ``dbcore.reference_catalog``, ``dbcore.eventlog`` and ``dbcore.notifications`` as
they were when this revision was written: a revision stays what it is when the code moves on.

Revision ID: 0008_ref_batches_notify_types
Revises: 0007_login_roles
Create Date: 2026-12-12
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_ref_batches_notify_types"
down_revision: str | Sequence[str] | None = "0007_login_roles"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REF_TAKE = r"""
    CREATE OR REPLACE FUNCTION vms.ref_take(
        p_uri text, p_count boolean, p_copy boolean, p_columns text[], p_holder text)
    RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services;
    BEGIN
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('uri', p_uri, 'error', 'not_found',
                                      'message', format('no referenceable entity %s', p_uri));
        END IF;
        s := vms.ref_service(e.service, true);
        IF e.deleted AND p_count THEN
            RETURN jsonb_build_object('uri', p_uri, 'error', 'deleted',
                                      'message', format('entity %s was deleted', p_uri));
        END IF;
        IF e.pending THEN  -- the first access stamps a new version, in the new epoch
            e := vms.ref_access(e);
            e.t := vms.ref_tick(e.service);
            e.k := s.epoch;
        END IF;
        IF p_count THEN
            e.d := e.d + 1;
            INSERT INTO vms.entity_holders AS h (uri, holder, count) VALUES (p_uri, p_holder, 1)
            ON CONFLICT (uri, holder) DO UPDATE SET count = h.count + 1;
        END IF;
        -- A copy is a read of the entity's state: a merge must not overwrite what it saw.
        UPDATE vms.entities SET t = e.t, k = e.k, d = e.d, pending = e.pending,
               restored_by = CASE WHEN p_copy THEN NULL ELSE e.restored_by END
         WHERE uri = p_uri;
        RETURN jsonb_build_object('uri', e.uri, 't', e.t, 'k', e.k, 'deleted', e.deleted,
                                  'copy', CASE WHEN p_copy THEN vms.ref_copy(e, p_columns) END);
    END $$
"""

GET_REFERENCE_AFTER = r"""
    CREATE OR REPLACE FUNCTION vms.get_reference(
        p_uri text, p_count boolean, p_copy boolean, p_columns text[], p_holder text)
    RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE answer jsonb := vms.ref_take(p_uri, p_count, p_copy, p_columns, vms.ref_caller(p_holder));
    BEGIN
        CASE answer ->> 'error'
            WHEN 'not_found' THEN
                RAISE EXCEPTION '%', answer ->> 'message' USING ERRCODE = 'VR404';
            WHEN 'deleted' THEN
                RAISE EXCEPTION '%', answer ->> 'message' USING ERRCODE = 'VR410';
            ELSE
                RETURN answer;
        END CASE;
    END $$
"""

GET_REFERENCE_BEFORE = r"""
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

"""

GET_REFERENCES = r"""
    CREATE OR REPLACE FUNCTION vms.get_references(
        p_uris text[], p_count boolean, p_copies jsonb, p_holder text)
    RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE
        holder_ text := vms.ref_caller(p_holder);
        answers jsonb[] := array_fill(NULL::jsonb, ARRAY[cardinality(p_uris)]);
        target record;
        copy_ jsonb;
    BEGIN
        -- The entities' rows are locked in URI order, whatever order the caller gave: two
        -- batches over the same entities then lock them in the same order. In the caller's
        -- order, one batch taking A then B and another B then A could deadlock (each holding
        -- the row the other waits for) until Postgres aborts one of them.
        FOR target IN SELECT u.uri, u.n::int AS n FROM unnest(p_uris) WITH ORDINALITY AS u(uri, n)
                       ORDER BY u.uri, u.n LOOP
            copy_ := coalesce(p_copies -> (target.n - 1), 'false');
            answers[target.n] := vms.ref_take(
                target.uri, p_count, copy_ <> 'false',
                CASE WHEN jsonb_typeof(copy_) = 'array'
                     THEN ARRAY(SELECT jsonb_array_elements_text(copy_)) END,
                holder_);
        END LOOP;
        RETURN to_jsonb(answers);
    END $$
"""

NOTIFY_PART = r"""
    CREATE OR REPLACE FUNCTION vms.notify_part(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
        SELECT replace(replace(replace(replace($1, '%', '%25'), ',', '%2C'), '=', '%3D'), '|', '%7C')
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
        -- The second line names each correlation with the event types it committed (the
        -- format: dbcore.notifications), so an outcome waiter is looked up only when a type it
        -- awaits committed; '*' (look at all) when the list would not fit in a notification.
        SELECT string_agg(vms.notify_part(c.correlation_id) || '=' || c.types, ',') INTO correlations
          FROM (SELECT correlation_id, string_agg(DISTINCT vms.notify_part(type), '|') AS types
                  FROM new_events WHERE correlation_id IS NOT NULL GROUP BY correlation_id) c;
        IF octet_length(coalesce(targets, '')) + octet_length(correlations) > 7000 THEN
            correlations := '*';
        END IF;
        IF targets IS NOT NULL OR correlations IS NOT NULL THEN
            PERFORM pg_notify('vms_events',
                              coalesce(targets, '') || E'\n' || coalesce(correlations, ''));
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


def upgrade() -> None:
    op.execute(REF_TAKE)
    op.execute(GET_REFERENCE_AFTER)
    op.execute(GET_REFERENCES)
    op.execute("REVOKE ALL ON FUNCTION vms.ref_take(text, boolean, boolean, text[], text) FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION vms.get_references(text[], boolean, jsonb, text) FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION vms.get_references(text[], boolean, jsonb, text) TO vms_services")
    op.execute(NOTIFY_PART)
    op.execute(FAN_OUT_AFTER)


def downgrade() -> None:
    op.execute(FAN_OUT_BEFORE)
    op.execute("DROP FUNCTION IF EXISTS vms.notify_part(text)")
    op.execute("DROP FUNCTION IF EXISTS vms.get_references(text[], boolean, jsonb, text)")
    op.execute(GET_REFERENCE_BEFORE)
    op.execute("DROP FUNCTION IF EXISTS vms.ref_take(text, boolean, boolean, text[], text)")
