"""The snapshot horizon, and who holds it back.

Deliveries become claimable only once every older transaction has ended (``delivery.py`` reads
below the snapshot's xmin, so that no event is skipped, G3). One transaction left open, idle or
busy, therefore stops every delivery behind it. :class:`HorizonWatch` notices a horizon that has
not moved for a while although deliveries wait behind it, and names the backend holding it: its
pid, application name, user and how long its transaction has been open, so that an operator can
end it (``pg_terminate_backend(pid)``) or fix the code that left it open.

Reading another role's session (``pg_stat_activity``) needs ``pg_read_all_stats``, which the
core role is given where the administrator can grant it (``dbcore.logins``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["Blocker", "HorizonWatch", "oldest_transaction"]

log = logging.getLogger("vmsdb.delivery")

# The horizon is the oldest transaction that holds a transaction id; the backend running it is
# the one to name. age(backend_xid) is how many transactions ago it began.
_OLDEST = text(
    """
    SELECT pid, coalesce(application_name, '') AS application_name, coalesce(usename, '') AS usename,
           coalesce(state, '') AS state,
           coalesce(extract(epoch FROM now() - xact_start), 0)::float8 AS age
      FROM pg_stat_activity
     WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
     ORDER BY age(backend_xid) DESC
     LIMIT 1
    """
)


@dataclass(frozen=True, slots=True)
class Blocker:
    """The backend whose open transaction is the oldest one."""

    pid: int
    application_name: str
    user: str
    state: str
    age: float  # seconds its transaction has been open

    def __str__(self) -> str:
        return (
            f"backend pid {self.pid} (application_name {self.application_name!r}, user "
            f"{self.user!r}, {self.state or 'state unknown'}) has held a transaction open for "
            f"{self.age:.0f} s"
        )


async def oldest_transaction(conn: AsyncConnection) -> Blocker | None:
    """The backend holding the oldest transaction id, or ``None`` (none, or not visible)."""
    row = (await conn.execute(_OLDEST)).first()
    if row is None:
        return None
    return Blocker(row.pid, row.application_name, row.usename, row.state, row.age)


class HorizonWatch:
    """Warns once per stall when deliveries wait behind a horizon that has not moved for
    ``after`` seconds; call :meth:`check` after each claim with whether deliveries are held back.
    """

    def __init__(self, service: str, after: float) -> None:
        self.service = service
        self.after = after
        self._horizon: str | None = None
        self._since = 0.0
        self._warned = False

    def stalled(self, held_back: bool, horizon: str) -> bool:
        """Whether deliveries have waited behind the same horizon for ``after`` seconds (and
        :meth:`warn` has not said so yet for it). ``horizon``: the horizon the claim saw
        (``Claim.horizon``), ``held_back``: whether deliveries waited behind it."""
        if not held_back:
            self._horizon = None
            return False
        now = time.monotonic()
        if horizon != self._horizon:
            self._horizon, self._since, self._warned = horizon, now, False
            return False
        return not self._warned and now - self._since >= self.after

    async def warn(self, conn: AsyncConnection) -> Blocker | None:
        """Warn, once per stall, of the transaction that holds the horizon; returns it."""
        self._warned = True
        blocker = await oldest_transaction(conn)
        log.warning(
            "%s: deliveries have waited %.0f s behind the snapshot horizon (xid %s): %s; every "
            "delivery waits until it ends (end it with pg_terminate_backend(%s), or lower "
            "idle_in_transaction_session_timeout)",
            self.service,
            time.monotonic() - self._since,
            self._horizon,
            blocker if blocker is not None else "its backend is not visible to the core role",
            blocker.pid if blocker is not None else "<pid>",
        )
        return blocker
