"""Hand-offs: a producer's deliveries to subscribers its own App runs, inserted claimed.

- ``vms.events`` gains ``handoff_to`` and ``handoff_claim``: the subscribers (comma-separated)
  whose deliveries of the event the fan-out inserts already claimed with that token.
- ``vms.fan_out`` claims them when that is safe (no older transaction open, no delivery of the
  same key waiting), leaves their subscribers out of the NOTIFY, and tells the producer how many
  it claimed with a NOTICE (SQLSTATE VMS02), which reaches it in the reply to its COMMIT.
- ``vms.ack_event``: ``vms.ack`` by the event's id (the App that handed a delivery off does not
  know its position).

Copied from ``dbcore.eventlog`` as it was when this revision was written: a revision stays what
it is when the code moves on.

Revision ID: 0009_handoff
Revises: 0008_ref_batches_notify_types
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_handoff"
down_revision: str | Sequence[str] | None = "0008_ref_batches_notify_types"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FAN_OUT_AFTER = r"""
    CREATE OR REPLACE FUNCTION vms.fan_out() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, vms AS $$
    DECLARE
        targets text;
        correlations text;
        handing boolean := false;
        handed integer;
    BEGIN
        IF EXISTS (SELECT 1 FROM new_events WHERE handoff_claim IS NOT NULL) THEN
            handing := pg_snapshot_xmin(pg_current_snapshot()) = pg_current_xact_id()
                AND NOT EXISTS (
                    SELECT 1 FROM new_events n
                      JOIN vms.deliveries e
                        ON e.subscriber = ANY(string_to_array(n.handoff_to, ',')) AND e.key = n.key
                     WHERE n.handoff_claim IS NOT NULL);
        END IF;
        WITH fanned AS (
            SELECT s.service, n.position, n.xid, n.type, n.key, n.handoff_claim,
                   handing AND n.handoff_claim IS NOT NULL
                       AND s.service = ANY(string_to_array(n.handoff_to, ',')) AS handed_to
              FROM new_events n JOIN vms.subscriptions s ON s.event_type = n.type
             WHERE NOT vms.undeclared(n.producer, n.type, n.origin)
        ),
        ranked AS (
            SELECT f.*, f.handed_to AND (f.key IS NULL OR row_number() OVER (
                       PARTITION BY f.service, f.key ORDER BY f.position) = 1) AS claimed
              FROM fanned f
        ),
        inserted AS (
            INSERT INTO vms.deliveries
                   (subscriber, position, xid, event_type, key, attempts, claim, claimed_until)
            SELECT r.service, r.position, r.xid, r.type, r.key,
                   CASE WHEN r.claimed THEN 1 ELSE 0 END,
                   CASE WHEN r.claimed THEN r.handoff_claim END,
                   CASE WHEN r.claimed THEN now() + make_interval(secs => 2.0) END
              FROM ranked r
        )
        SELECT string_agg(DISTINCT service, ',') FILTER (WHERE NOT handed_to),
               count(*) FILTER (WHERE claimed)
          INTO targets, handed
          FROM ranked;
        IF handed > 0 THEN
            RAISE NOTICE 'vms: % deliveries handed off', handed
                  USING ERRCODE = 'VMS02', DETAIL = handed::text;
        END IF;
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

ACK_EVENT = r"""
    CREATE OR REPLACE FUNCTION vms.ack_event(p_subscriber text, p_event uuid, p_claim uuid)
    RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, vms AS $$
    BEGIN
        IF NOT pg_has_role(session_user, vms.service_role(p_subscriber), 'MEMBER') THEN
            RAISE EXCEPTION 'permission denied to acknowledge deliveries to %', p_subscriber
                  USING ERRCODE = '42501';
        END IF;
        DELETE FROM vms.deliveries d USING vms.events e
         WHERE e.id = p_event AND d.subscriber = p_subscriber AND d.position = e.position
           AND d.claim = p_claim;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'delivery of event % to % is no longer claimed by this worker',
                            p_event, p_subscriber
                  USING ERRCODE = 'VMS01';
        END IF;
    END $$
"""


def upgrade() -> None:
    op.execute("ALTER TABLE vms.events ADD COLUMN IF NOT EXISTS handoff_to text")
    op.execute("ALTER TABLE vms.events ADD COLUMN IF NOT EXISTS handoff_claim uuid")
    op.execute(FAN_OUT_AFTER)
    op.execute(ACK_EVENT)
    op.execute("REVOKE ALL ON FUNCTION vms.ack_event(text, uuid, uuid) FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION vms.ack_event(text, uuid, uuid) TO vms_services")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS vms.ack_event(text, uuid, uuid)")
    op.execute(FAN_OUT_BEFORE)
    op.execute("ALTER TABLE vms.events DROP COLUMN IF EXISTS handoff_claim")
    op.execute("ALTER TABLE vms.events DROP COLUMN IF EXISTS handoff_to")
