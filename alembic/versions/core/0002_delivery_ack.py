"""``vms.ack``: a delivery's "handled" mark that can travel in the handler's COMMIT message; free
space in ``vms.deliveries`` pages, so that claims are HOT updates.

Copied from ``dbcore.eventlog`` (``ACK_FUNCTION``, ``DELIVERIES_FILLFACTOR``): a revision stays
what it is when the code moves on.

Revision ID: 0002_delivery_ack
Revises: 0001_catalog
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002_delivery_ack"
down_revision: str | Sequence[str] | None = "0001_catalog"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACK_FUNCTION = """
    CREATE OR REPLACE FUNCTION vms.ack(p_subscriber text, p_position bigint, p_claim uuid)
    RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, vms AS $$
    BEGIN
        DELETE FROM vms.deliveries
         WHERE subscriber = p_subscriber AND position = p_position AND claim = p_claim;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'delivery % of % is no longer claimed by this worker',
                            p_position, p_subscriber
                  USING ERRCODE = 'VMS01';
        END IF;
    END $$
"""


def upgrade() -> None:
    op.execute(ACK_FUNCTION)
    op.execute("ALTER TABLE vms.deliveries SET (fillfactor = 50)")


def downgrade() -> None:
    op.execute("ALTER TABLE vms.deliveries RESET (fillfactor)")
    op.execute("DROP FUNCTION IF EXISTS vms.ack(text, bigint, uuid)")
