"""Hand-offs: an event handled in the App that sent it, without a notification and a claim.

Without a hand-off, a delivery reaches a handler of the App that produced it in three steps
after the producer's ``COMMIT``: the core's NOTIFY, the dispatcher's claim (a statement and a
transaction of its own), then a worker. With one, the producer's transaction asks the fan-out
to insert the deliveries to this App's own subscribers already claimed, with a token the App
chose; the fan-out leaves those subscribers out of the NOTIFY, and the App queues the
deliveries for its workers as soon as the ``COMMIT`` returns, as if its dispatcher had claimed
them. Exactly once (G4) and order (G3, G5) hold as for any claim:

- The fan-out claims only what the dispatcher's own claim would take at once: no transaction
  older than the producer's is still open (none can commit an earlier event later), and no
  delivery of the same key is waiting for any of the subscribers. Otherwise it claims nothing
  and notifies as usual: all or nothing (``dbcore.eventlog.FAN_OUT_FUNCTION``).
- A handed-off delivery is acknowledged by its claim in the handler's transaction
  (``vms.ack_event``), like any other; its claim lasts ``HANDOFF_SECONDS`` and the dispatcher's
  heartbeat renews it. If the App dies (kill -9) before the handler commits, the claim runs
  out and any process of the App claims the delivery again on its next poll.
- The producer learns whether the fan-out claimed from its NOTICE, which arrives in the reply
  to the ``COMMIT`` message (``dbcore.outbox.handed_off``): no statement, no round trip.

No delivery of a type whose handler declares a precedence is handed off (the dispatcher's claim
alone checks it), and none to a service that stops or recovers. Under concurrency the first condition
fails often (some other transaction is nearly always open); the hand-off then costs the fan-out
one check, and the delivery takes the usual way.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

from dbcore.delivery import HANDED_OFF_POSITION, Claimed
from dbcore.eventlog import EventRecord

__all__ = ["HandOff", "Planned", "Taker"]

log = logging.getLogger("vmsdb.delivery")


@dataclass(frozen=True, slots=True)
class Planned:
    """The deliveries one transaction asked the fan-out to hand off, by subscriber."""

    #: One per subscriber and key (the first of a key; the others wait behind it, as
    #: ``followed``): what the fan-out claims when it hands them off.
    items: Sequence[Claimed]


class Taker(Protocol):
    """What a hand-off needs of a service's dispatcher (``framework._internal.dispatcher``)."""

    @property
    def service(self) -> str: ...

    @property
    def handlers(self) -> Collection[str]:
        """The event types it handles."""
        ...

    @property
    def replicas(self) -> Collection[str]:
        """The change events of the replicas it keeps."""
        ...

    @property
    def waiting(self) -> Collection[str]:
        """The event types that wait for others (``precedence=``)."""
        ...

    @property
    def accepts_hand_offs(self) -> bool: ...

    def take_over(self, items: list[Claimed]) -> None: ...


class HandOff:
    """Which of this App's dispatchers take which events over from their producers."""

    def __init__(self, dispatchers: Mapping[str, Taker]) -> None:
        self._dispatchers = dict(dispatchers)
        self._to: dict[str, tuple[Taker, ...]] = {}  # by event type: who may take it over
        self._waiting: dict[str, set[str]] = {}  # by event type: who handles it, never handed
        for dispatcher in dispatchers.values():
            for event_type in (*dispatcher.handlers, *dispatcher.replicas):
                if event_type in dispatcher.waiting:
                    self._waiting.setdefault(event_type, set()).add(dispatcher.service)
                else:
                    self._to[event_type] = (*self._to.get(event_type, ()), dispatcher)

    def plan(self, records: Sequence[EventRecord]) -> tuple[list[EventRecord], Planned | None]:
        """``records`` marked for a hand-off to this App's subscribers of their types, and what
        was asked; ``(records, None)`` when none of them has one that may take it."""
        claim = uuid.uuid4()
        now = datetime.now(UTC)
        items: list[Claimed] = []
        first_of: dict[tuple[str, str], int] = {}  # (subscriber, key) -> index in items
        marked: list[EventRecord] = []
        # A subscriber that also gets an event of a waiting type from this transaction takes
        # none over: that event may come first in its key, and only a claim checks it.
        refused = {service for r in records for service in self._waiting.get(r.type, ())}
        for record in records:
            takers = [
                d for d in self._to.get(record.type, ()) if d.accepts_hand_offs and d.service not in refused
            ]
            if not takers:
                marked.append(record)
                continue
            for dispatcher in takers:
                if record.key is not None:
                    first = first_of.get((dispatcher.service, record.key))
                    if first is not None:  # waits behind the first, claimed when it is done
                        items[first] = replace(items[first], followed=True)
                        continue
                    first_of[(dispatcher.service, record.key)] = len(items)
                items.append(
                    Claimed(
                        subscriber=dispatcher.service,
                        position=HANDED_OFF_POSITION,
                        event_id=record.id,
                        event_type=record.type,
                        key=record.key,
                        payload=record.payload,
                        correlation_id=record.correlation_id,
                        attempts=1,
                        claim=claim,
                        created_at=now,
                        trace_context=record.trace_context,
                    )
                )
            to = ",".join(d.service for d in takers)
            marked.append(replace(record, handoff_to=to, handoff_claim=claim))
        if not items:
            return list(records), None
        return marked, Planned(items)

    def deliver(self, planned: Planned, claimed: int) -> None:
        """Queue what the fan-out claimed (``claimed`` deliveries: all of ``planned`` or none)
        for the workers, as the dispatchers' own claims."""
        if claimed != len(planned.items):
            if claimed:
                log.warning(
                    "a hand-off claimed %d deliveries where %d were asked; they will be claimed "
                    "again once their claims run out",
                    claimed,
                    len(planned.items),
                )
            return
        by_service: dict[str, list[Claimed]] = {}
        for item in planned.items:
            by_service.setdefault(item.subscriber, []).append(item)
        for service, items in by_service.items():
            self._dispatchers[service].take_over(items)
