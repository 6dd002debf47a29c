"""Delivering events to one service's ``@Inbound`` handlers, in this process.

A dispatcher claims deliveries (see ``dbcore.delivery`` for the ordering rules) ahead of need,
up to four times ``worker_concurrency``, and queues them for the App's handler workers
(``framework._internal.workers``), which run each handler in the handler's transaction and acknowledge it in
that same transaction. Claims come back at most one per partition key, so handlers of different
keys run concurrently and handlers of one key run one after another, in order. Claiming ahead
keeps the workers busy while the next claim is on its way: one claim round trip serves many
handlers.

The dispatchers of an App claim together (:class:`Claims`): those that want a claim at the
same moment (a notification naming several subscribers wakes them all at once) share one
statement, one snapshot and one housekeeping connection.

It wakes on the core's NOTIFY, when a handled event had its key's next event behind it, and
when a retry is due; it polls every 20 ms while events wait behind the snapshot horizon (an
older transaction still open), and every ``poll_interval`` as a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from dbcore import delivery, replicas
from dbcore.delivery import Ack, Claim, Claimed, ClaimLost, ClaimRequest
from dbcore.descriptor import ReplicaDescriptor
from dbcore.horizon import HorizonWatch
from dbcore.replicas import change_event_type
from framework._internal import telemetry
from framework._internal.events import Event
from framework._internal.runtime import backoff_delay
from framework._internal.workers import HandlerWorkers, Job

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from framework._internal.descriptors import CallPlan
    from framework._internal.host import Host
    from framework._internal.runtime import ServiceRuntime

__all__ = ["Claims", "Dispatcher"]

log = logging.getLogger("vmsdb.delivery")

_HELD_BACK_POLL = 0.02
#: A claim lives this long unless its worker renews it (capped by ``claim_timeout``), and the
#: worker renews its live claims every ``_HEARTBEAT``: the claims of a worker killed with
#: kill -9 come back within about ``_LIVENESS`` plus another worker's ``poll_interval``,
#: not after ``claim_timeout``. A worker whose event loop stalls longer than ``_LIVENESS``
#: loses its claims to another worker; its acks then fail and its attempts roll back (G4).
_HEARTBEAT = 0.5
_LIVENESS = 2.0
_REPLICA_ATTEMPTS = 5
#: A claimed delivery not started within this share of the claim timeout is left to run out.
_START_WITHIN = 0.8


class Claims:
    """The claims of an App's dispatchers: the requests made while one loop iteration runs go
    out as one statement (``delivery.claim_batches``), each request answered with its own
    subscriber's part. A statement in flight does not hold later requests back: they go out
    in the next one."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.lease_seconds = min(host.settings.claim_timeout, _LIVENESS)
        self._waiting: dict[str, tuple[ClaimRequest, asyncio.Future[Claim]]] = {}
        self._sending: asyncio.Task[None] | None = None

    async def claim(self, request: ClaimRequest) -> Claim:
        """``request``'s subscriber's claim (one request per subscriber at a time)."""
        future: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._waiting[request.subscriber] = (request, future)
        if self._sending is None:
            self._sending = asyncio.create_task(self._send(), name="vmsdb-claims")
        return await future

    async def _send(self) -> None:
        # One turn of the loop: the dispatchers woken by the same notification ask first.
        await asyncio.sleep(0)
        waiting, self._waiting, self._sending = self._waiting, {}, None
        requests = [request for request, _ in waiting.values()]
        try:
            async with self.host.core.housekeeping_autocommit() as conn:
                claims = await delivery.claim_batches(conn, requests, lease_seconds=self.lease_seconds)
        except Exception as err:  # each dispatcher logs it and tries again
            for _, future in waiting.values():
                if not future.done():
                    future.set_exception(err)
            return
        self.host.metrics.observe("claim_subscribers", len(requests))
        for subscriber, (_, future) in waiting.items():
            if not future.done():  # else its dispatcher was cancelled: the claim runs out
                future.set_result(claims[subscriber])


class Dispatcher:
    """Runs the ``@Inbound`` handlers of one service."""

    def __init__(self, host: Host, runtime: ServiceRuntime, workers: HandlerWorkers, claims: Claims) -> None:
        self.host = host
        self.runtime = runtime
        self.workers = workers
        self.claims = claims
        self.service = runtime.name
        settings = host.settings
        # Claimed and not yet finished, at most four times what the workers run at once; the
        # next claim goes out once a round is done, while two more rounds are still queued, so
        # that the workers do not wait for it, and brings at least a round (one round trip for
        # many handlers).
        self.depth = 4 * settings.worker_concurrency
        self.low_water = 3 * settings.worker_concurrency
        self.claim_timeout = settings.claim_timeout
        self.poll_interval = settings.poll_interval
        self.handlers: dict[str, tuple[CallPlan, type[Event]]] = {
            call.spec.inbound.event.event_type(): (call, call.spec.inbound.event)
            for call in runtime.plan.calls.values()
            if call.spec.inbound is not None
        }
        self.replicas: dict[str, ReplicaDescriptor] = {
            change_event_type(r.source_service, r.source_table): r
            for r in runtime.plan.descriptor.replicas
            if r.consistency == "eventual"
        }
        self.has_precedence = any(i.precedence for i in runtime.plan.descriptor.inbound)
        #: The event types that wait for others (named in a ``precedence=``): never handed off.
        self.waiting = frozenset(t for i in runtime.plan.descriptor.inbound for t in i.precedence)
        #: The event types others wait for (``precedence=`` on their handler): only a finished
        #: one of these can make a delivery of another key claimable.
        self.preceding = frozenset(i.event for i in runtime.plan.descriptor.inbound if i.precedence)
        self._wake = asyncio.Event()
        self._horizon = HorizonWatch(self.service, settings.horizon_warning)
        self._outstanding = 0  # claimed, not yet finished
        self._saturated = False  # the last claim took as many as it asked for
        self._unblocked = False  # since the last claim, a key's head finished with more behind
        self._blocked = False  # the last claim left deliveries behind running ones
        self._finishes = 0  # deliveries finished so far
        #: Claimed and not finished, by event: the claim and when it must end (loop time,
        #: ``claim_timeout`` after it was taken), for the heartbeat.
        self._live: dict[uuid.UUID, tuple[Claimed, float]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"vmsdb-dispatch-{self.service}")
        self._heartbeat = asyncio.create_task(self._renew(), name=f"vmsdb-heartbeat-{self.service}")

    def wake(self) -> None:
        self._wake.set()

    @property
    def accepts_hand_offs(self) -> bool:
        """Whether a producer in this App may hand this service its deliveries now
        (``framework._internal.handoff``): not while it stops or recovers."""
        return not self._stopping and self.service not in self.host.recovering

    def take_over(self, items: list[Claimed]) -> None:
        """Run ``items``, which their producer's transaction claimed for this service (a
        hand-off), as if this dispatcher's claim had taken them."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        ends, start_before = now + self.claim_timeout, now + self.claim_timeout * _START_WITHIN
        self._outstanding += len(items)
        for item in items:
            self._live[item.event_id] = (item, ends)
            self.workers.submit(Job(self, item, start_before))
        self.host.metrics.inc("deliveries_handed_off", len(items), service=self.service)

    def finished(self, item: Claimed) -> None:
        """``item`` is done with (handled, retried, dead-lettered or given back)."""
        self._outstanding -= 1
        self._finishes += 1
        self._live.pop(item.event_id, None)
        if self._stopping and not self._live:
            self._stop_heartbeat()
        # Claim again once below the low water mark, if there may be more to claim: the last
        # claim took all it asked for, or a finished head had its key's next event behind it,
        # or it was of a type that later deliveries of other types wait for (precedence), or
        # the last claim saw deliveries waiting behind running ones. New events wake the
        # dispatcher by notification; a claim after anything else finds nothing.
        self._unblocked = (
            self._unblocked or item.followed or self._blocked or item.event_type in self.preceding
        )
        if self._outstanding <= self.low_water and (self._saturated or self._unblocked):
            self._wake.set()

    async def stop(self) -> None:
        """Stop claiming; claimed deliveries are the workers' (``HandlerWorkers.stop``)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if not self._live:  # else the heartbeat keeps the running handlers' claims alive
            self._stop_heartbeat()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if self._outstanding > self.low_water or self.service in self.host.recovering:
                # Enough claimed; or recovering in consistency mode (G10), when its events wait
                # rather than fail (the App wakes the dispatcher when the recovery ends).
                await self._wait(self.poll_interval)
                continue
            limit = self.depth - self._outstanding
            finishes = self._finishes
            ends = loop.time() + self.claim_timeout
            self._unblocked = False
            held_back = False
            try:
                # One statement (shared with the other dispatchers asking now): the claim, and
                # whether others wait behind the horizon.
                batch = await self.claims.claim(ClaimRequest(self.service, limit, self.has_precedence))
                claimed = batch.items
                self._blocked = batch.blocked
                if batch.blocked and self._finishes != finishes:
                    # One finished while the claim was on its way: it may have unblocked what
                    # the claim saw blocked, and its finished() read the previous view.
                    self._wake.set()
                start_before = loop.time() + self.claim_timeout * _START_WITHIN
                self._saturated = len(claimed) == limit
                self._outstanding += len(claimed)
                for item in claimed:  # before the horizon check: the workers start at once
                    self._live[item.event_id] = (item, ends)
                    self.workers.submit(Job(self, item, start_before))
                if claimed:
                    self.host.metrics.observe("claim_batch_size", len(claimed), service=self.service)
                if self._saturated:
                    continue  # there may be more; claim again at the low water mark
                held_back = batch.held_back
                # Warns of a long-open transaction (the claim read the horizon).
                if self._horizon.stalled(held_back, batch.horizon):
                    async with self.host.core.housekeeping_autocommit() as conn:
                        await self._horizon.warn(conn)
            except Exception:  # the database went away: log, try again after poll_interval
                log.exception("%s: claiming deliveries failed", self.service)
            # Everything claimable is claimed. What makes more claimable wakes the dispatcher:
            # a notification for new events, a finished head with its key's next event behind
            # it, a retry's backoff running out. Only the horizon moving (an older transaction,
            # one that sent no events, ending) comes without a wake-up: poll for that while
            # events wait behind it. poll_interval is the fallback for the rest (another
            # process's claims running out, a notification lost with the listener).
            await self._wait(_HELD_BACK_POLL if held_back else self.poll_interval)

    async def _renew(self) -> None:
        """The heartbeat: every ``_HEARTBEAT``, extend this dispatcher's live claims by
        ``_LIVENESS``, never past ``claim_timeout`` after each was taken (a handler stuck that
        long is given to another worker, as without the heartbeat)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_HEARTBEAT)
            now = loop.time()
            claims = [(item, min(_LIVENESS, ends - now)) for item, ends in self._live.values() if ends > now]
            if not claims:
                continue
            try:
                async with self.host.core.housekeeping_autocommit() as conn:
                    await delivery.renew(conn, self.service, claims)
            except Exception:  # the database went away; unrenewed claims run out, as they would
                if self._stopping:
                    return
                log.exception("%s: renewing %d claim(s) failed", self.service, len(claims))

    async def _wait(self, timeout: float) -> None:
        """Sleep until woken (see ``_run``) or ``timeout``."""
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    async def handle(self, item: Claimed, conn: AsyncConnection) -> None:
        """Run ``item``'s handler on a worker's connection (``HandlerWorkers``)."""
        if self.service in self.host.recovering:
            # Claimed before a consistency-mode recovery began: give it back untried, so that it
            # waits for the recovery instead of spending its attempts on refusals.
            async with self.host.core.housekeeping() as admin:
                await delivery.release(admin, item)
            return
        replica = self.replicas.get(item.event_type)
        if replica is not None:
            await self._apply_replica(item, replica, conn)
            return
        call, event_type = self.handlers.get(item.event_type, (None, None))
        if call is None or event_type is None:
            await self._dead_letter(
                item, f"service {self.service!r} has no handler for {item.event_type}", None
            )
            return
        spec = call.spec
        try:
            event = _event_of(event_type, item)
        except ValidationError as err:
            # A payload that does not validate will never validate: no retries (G12).
            assert spec.inbound is not None
            await self._dead_letter(
                item,
                f"payload is not a valid {event_type.__name__}: {err}",
                None,
                blocking=spec.inbound.blocking,
            )
            return
        assert spec.inbound is not None
        started = time.perf_counter()
        try:
            run = self.runtime.run(
                call,
                spec.function,
                (self.runtime.instance, event),
                {},
                correlation_id=item.correlation_id,
                causation_id=str(item.event_id),
                connection=conn,
                before_commit=Ack(item),
            )
            await telemetry.handling(item, self.service, spec.inbound.max_attempts, run)
            self.host.metrics.inc("events_handled", service=self.service, event=item.event_type)
            self.host.metrics.observe(
                "handler_duration_seconds", time.perf_counter() - started,
                service=self.service, event=item.event_type,
            )  # fmt: skip
        except ClaimLost as err:
            log.warning("%s: %s", self.service, err)
        except Exception as err:
            await self._failed(
                item, spec.qualname, spec.inbound.max_attempts, err, blocking=spec.inbound.blocking
            )

    def group_limit(self, item: Claimed) -> int:
        """``@Inbound(group_commit=)`` of ``item``'s handler, or 1 where a group would change
        what the handler's run looks like: a retried delivery (a poison event must not roll
        back others), a recovering service or reads in amnesia (epochs), tracing (one span per
        handled event, each its own transaction)."""
        entry = self.handlers.get(item.event_type)
        if (
            entry is None
            or entry[0].tx is None
            or item.attempts > 1
            or self._stopping
            or self.host.amnesia
            or self.service in self.host.recovering
            or telemetry.tracer is not None
        ):
            return 1
        inbound = entry[0].spec.inbound
        return 1 if inbound is None else inbound.group_commit

    def groups_with(self, first: Claimed, other: Claimed) -> bool:
        return other.event_type == first.event_type and other.attempts == 1

    async def handle_group(self, items: list[Claimed], conn: AsyncConnection) -> None:
        """Run the handler of ``items`` (one event type, see :meth:`group_limit`) for all of
        them in one transaction, acknowledging all with its commit; if anything fails, roll
        back and run each on its own (:meth:`handle`), with its own retries."""
        if self.service in self.host.recovering or self.host.amnesia:
            # A recovery (or amnesia) began after the group was formed: each on its own path.
            for item in items:
                await self.handle(item, conn)
            return
        call, event_type = self.handlers[items[0].event_type]
        events: list[tuple[Claimed, Event]] = []
        for item in items:
            try:
                events.append((item, _event_of(event_type, item)))
            except ValidationError:
                await self.handle(item, conn)  # dead-letters it
        if len(events) <= 1:
            for item, _ in events:
                await self.handle(item, conn)
            return
        started = time.perf_counter()
        try:
            await self.runtime.run_group(call, events, conn)
        except Exception as err:
            log.info(
                "%s: a group of %d %s deliveries failed (%s: %s); each runs again on its own",
                self.service, len(events), items[0].event_type, type(err).__name__, err,
            )  # fmt: skip
            self.host.metrics.inc("group_commit_splits", service=self.service, event=items[0].event_type)
            for item, _ in events:
                await self.handle(item, conn)
            return
        elapsed = time.perf_counter() - started
        self.host.metrics.observe("group_commit_size", len(events), service=self.service)
        for item, _ in events:
            self.host.metrics.inc("events_handled", service=self.service, event=item.event_type)
            self.host.metrics.observe(
                "handler_duration_seconds", elapsed, service=self.service, event=item.event_type
            )

    async def _apply_replica(self, item: Claimed, replica: ReplicaDescriptor, conn: AsyncConnection) -> None:
        """A change of a replicated source row: apply it and mark it handled, in one transaction."""
        payload = json.loads(item.payload) if isinstance(item.payload, (str, bytes)) else item.payload
        try:
            async with self.host.core.transaction(self.service, connection=conn, before_commit=Ack(item)):
                await replicas.apply_change(conn, self.service, replica, payload)
            self.host.metrics.inc("replica_changes", service=self.service, table=replica.table)
        except ClaimLost as err:
            log.warning("%s: %s", self.service, err)
        except Exception as err:
            await self._failed(item, f"replica {replica.table}", _REPLICA_ATTEMPTS, err)

    async def _failed(
        self, item: Claimed, handler: str, max_attempts: int, err: Exception, *, blocking: bool = False
    ) -> None:
        error = f"{type(err).__name__}: {err}"
        self.host.metrics.inc("events_failed", service=self.service, event=item.event_type)
        if item.attempts >= max_attempts:
            await self._dead_letter(item, error, traceback.format_exc(), blocking=blocking)
            return
        delay = backoff_delay(item.attempts, base=0.05, cap=30.0)
        log.warning(
            "%s: %s failed on event %s (attempt %d of %d), retrying in %.0f ms: %s",
            self.service,
            handler,
            item.event_id,
            item.attempts,
            max_attempts,
            delay * 1000,
            error,
        )
        self.host.metrics.inc("event_retries", service=self.service, event=item.event_type)
        async with self.host.core.housekeeping() as conn:
            await delivery.retry_later(conn, item, error, delay)
        asyncio.get_running_loop().call_later(delay, self.wake)

    async def _dead_letter(
        self, item: Claimed, error: str, trace: str | None, *, blocking: bool = False
    ) -> None:
        log.error(
            "%s: event %s (%s) goes to the dead letters after %d attempt(s)%s: %s",
            self.service,
            item.event_id,
            item.event_type,
            item.attempts,
            " and holds its key until replayed" if blocking else "",
            error,
        )
        self.host.metrics.inc("dead_letters", service=self.service, event=item.event_type)
        async with self.host.core.housekeeping() as conn:
            await delivery.dead_letter(conn, item, error, trace, blocking=blocking)


def _event_of(event_type: type[Event], item: Claimed) -> Event:
    """``item``'s payload as an ``event_type``; ``ValidationError`` when it is not one."""
    payload: Any = item.payload
    if isinstance(payload, (str, bytes)):
        return event_type.model_validate_json(payload)
    return event_type.model_validate(payload)
