"""Reads that begin an epoch (recovery paper §3.3, Definition 2), from the framework's side.

"A new epoch E_k begins at the first reading or written access of an entity." Writes reach the
core through the row triggers; reads leave no trace in Postgres, so the framework reports them:

- entities a service function loads through ``session()`` (its own referenceable models, or
  another service's exported ones), by their URIs, at the end of the function, before commit;
- a ``@Query``: every restored entity of each referenceable table it reads, since a query's rows
  need not carry their keys (conservative: a later copy of such an entity becomes a reported
  conflict, never a silent overwrite).

Both go to ``vms.ref_read`` in the reading transaction. All of this happens only while some
service has restored entities nobody has read or written yet (``Host.amnesia``, kept from the
recovery notifications and from the core's answers); otherwise a read costs what it always did:
one set test per transaction. In amnesia a transaction declared read-only runs read-write, since
``vms.ref_read`` updates the catalog; the function still cannot write (``TxContext.read_only``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from dbcore.errors import ServiceRecovering
from dbcore.query_language import QuerySpec
from dbcore.references import read_entities, services_in_amnesia, uri_for
from framework._internal.context import TxContext

if TYPE_CHECKING:
    from framework._internal.host import Host

__all__ = ["ReadLog", "load_amnesia", "record_query_reads", "refuse_recovering_owners", "track"]

_KEY = "vms_epoch_reads"


class ReadLog:
    """The referenceable entities one transaction loaded, by owner service; and the owners that
    have no restored entity left once it commits."""

    __slots__ = ("emptied", "uris")

    def __init__(self) -> None:
        self.uris: dict[str, set[str]] = {}
        self.emptied: set[str] = set()


def _loaded(session: Session, instance: Any) -> None:
    cls = type(instance)
    if not getattr(cls, "__vms_referenceable__", False):
        return
    log: ReadLog = session.info[_KEY]
    owner = cls.__vms_service__.service_name()
    table = cls.__table__.name
    log.uris.setdefault(owner, set()).add(uri_for(owner, table, *inspect(instance).identity))


def track(host: Host, ctx: TxContext) -> ReadLog | None:
    """Start recording the entities ``ctx``'s session loads, if any service is in amnesia."""
    if not host.amnesia:
        return None
    log = ReadLog()
    session = ctx.session.sync_session
    session.info[_KEY] = log
    event.listen(session, "loaded_as_persistent", _loaded)
    return log


async def record(host: Host, ctx: TxContext, log: ReadLog) -> None:
    """Report what ``ctx`` loaded, in its transaction (before it commits)."""
    for owner, uris in log.uris.items():
        if owner in host.amnesia and not await read_entities(ctx.connection, owner, sorted(uris)):
            log.emptied.add(owner)


def settle(host: Host, log: ReadLog | None) -> None:
    """After commit: owners whose restored entities have all been read need no more reports."""
    if log is not None:
        host.amnesia.difference_update(log.emptied)


def _owners(compiled: QuerySpec) -> Iterable[tuple[str, str]]:
    return dict.fromkeys(compiled.entities)


def refuse_recovering_owners(host: Host, caller: str, compiled: QuerySpec) -> None:
    """A ``@Query`` reading a table of a service recovering in consistency mode is refused."""
    for owner, table in _owners(compiled):
        if owner in host.recovering:
            raise ServiceRecovering(
                f"service {caller!r} cannot query {owner}.{table}: service {owner!r} is recovering "
                "in consistency mode and serves no reads until every holder of its references "
                "has answered (or the recovery times out); retry later"
            )


async def record_query_reads(host: Host, conn: Any, compiled: QuerySpec) -> set[str]:
    """Report a ``@Query``'s read of every table it names whose owner is in amnesia; return
    the owners with no restored entity left (to :func:`settle` once committed)."""
    emptied: set[str] = set()
    for owner, table in _owners(compiled):
        if owner in host.amnesia and not await read_entities(conn, owner, table=table):
            emptied.add(owner)
    return emptied


async def load_amnesia(host: Host) -> None:
    """Learn, at start, which services still have restored entities nobody read or wrote."""
    async with host.core.admin() as conn:
        host.amnesia.update(await services_in_amnesia(conn))
