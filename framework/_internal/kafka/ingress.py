"""Kafka ingress: messages on the subscribed topics become events in this core's log.

Each consumed message is inserted into the local ``vms.events`` (``origin = "kafka:<topic>"``,
duplicates by event id ignored) in one transaction per round, and the Kafka offsets are committed
only after that transaction commits. From there the core's fan-out and dispatchers deliver it
like any local event, with exactly-once effects (G4): a crash between the insert and the offset
commit reads the message again and its insert is a no-op. A message that cannot become an event
goes to ``vms.dead_letters`` with its raw bytes, in the same transaction, and consumption goes on.

The reference and recovery protocol (``dbcore.reference_events``) travels the same way when the
App declares references: a protocol event from another core is inserted like any other and, when
it is new, applied (``handle_event``) in that same transaction, so it takes effect once; what it
answers goes into the local log, and the relay carries it back.

Precedence (``@Inbound(A, precedence=B)``: every A committed before a B is handled before that B).
Locally the dispatcher holds a B back while an A with a smaller log position is pending, so what
the ingress must ensure is that those A's are *in the local log before the B*. The relay of the
producing core publishes in log order, one event type run at a time, each acknowledged before the
next (see ``relay.py``): when a B is in Kafka, every A committed before it is in Kafka too, in
one of the partitions of A's topic, below that partition's end offset. So when a B arrives the
ingress notes, for every partition of A's topics, the end offset as of then (its *target*), and
inserts the B only once each of those partitions has been inserted up to its target; the A's
then get smaller log positions than the B. Until then the B (and what follows it in its
partition, to keep per-key order) is held, its partition paused, and the other partitions keep
flowing. The targets are fixed once, so a steady stream of later A's cannot hold a B forever.
The end offset is the larger of a ListOffsets answer requested after the B arrived (exact on
Kafka) and the high watermark of a fetch answered after it arrived (the test broker, tansu,
answers ListOffsets with the start of the last batch rather than the end of the partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.core import Core
from dbcore.errors import CoreError
from dbcore.eventlog import append
from dbcore.reference_events import handle_event
from dbcore.relay import DeadInput, dead_letter_input
from framework._internal import telemetry
from framework._internal.kafka.codec import PROTOCOL_SUBSCRIBER, Incoming, decode, source_of
from framework._internal.kafka.health import Outage
from framework._internal.kafka.options import KafkaOptions
from framework._internal.kafka.routing import Routing

__all__ = ["Ingress"]

log = logging.getLogger("vmsdb.kafka.ingress")

_STOP_GRACE = 5.0
_SAVEPOINT = text("SAVEPOINT vms_protocol")
_RELEASE_SAVEPOINT = text("RELEASE SAVEPOINT vms_protocol")
_ROLLBACK_TO_SAVEPOINT = text("ROLLBACK TO SAVEPOINT vms_protocol")
_LIST_OFFSETS_TIMEOUT = 5.0


@dataclass
class _Pending:
    """A consumed message not yet in the log."""

    tp: TopicPartition
    offset: int
    incoming: Incoming
    arrived_ms: float
    #: Offsets from a ListOffsets request made after this message arrived.
    listed: dict[TopicPartition, int] | None = None
    #: Fixed once known: partition -> offset it must be inserted up to before this message.
    targets: dict[TopicPartition, int] | None = None
    waits_on: tuple[TopicPartition, ...] = field(default_factory=tuple)


class Ingress:
    """Feeds this App's ``@Inbound`` handlers of remote services from Kafka."""

    def __init__(self, core: Core, options: KafkaOptions, routing: Routing) -> None:
        self.core = core
        self.options = options
        self.routing = routing
        self.group_id = options.group_id or routing.group_id
        self.ingested = 0
        self.dead_letters = 0
        #: Per partition, the next offset to read as last committed (served as a metric).
        self.committed: dict[TopicPartition, int] = {}
        self.assigned = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._buffers: dict[TopicPartition, deque[_Pending]] = defaultdict(deque)
        self._generation = 0
        self._kafka = Outage(log, f"kafka ingress {self.group_id}: Kafka")
        self._db = Outage(log, f"kafka ingress {self.group_id}: the database")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"vmsdb-kafka-ingress-{self.group_id}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=_STOP_GRACE)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- consumer lifecycle ------------------------------------------------------------------

    def _rebalanced(self, revoked: Iterable[TopicPartition], assigned: Iterable[TopicPartition]) -> None:
        # Whatever was held for a revoked partition is read again by its next owner from the
        # committed offset; a round in progress must not commit offsets for it.
        for tp in revoked:
            self._buffers.pop(tp, None)
        self._generation += 1
        if any(True for _ in assigned):
            self.assigned.set()

    async def _open(self) -> AIOKafkaConsumer | None:
        ingress = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                ingress._rebalanced(revoked, ())

            async def on_partitions_assigned(self, assigned: Any) -> None:
                ingress._rebalanced((), assigned)

        while not self._stopping:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.options.bootstrap,
                group_id=self.group_id,
                client_id=f"vmsdb-ingress-{self.group_id}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.options.fetch_max_wait_ms,
                session_timeout_ms=self.options.session_timeout_ms,
                heartbeat_interval_ms=max(self.options.session_timeout_ms // 3, 100),
                rebalance_timeout_ms=self.options.session_timeout_ms,
            )
            consumer.subscribe(list(self.routing.topics), listener=Listener())
            try:
                await consumer.start()
            except KafkaError as err:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                self._kafka.failed(err)
                await asyncio.sleep(self.options.poll_interval)
                continue
            self._kafka.ok()
            return consumer
        return None

    async def _run(self) -> None:
        consumer = await self._open()
        if consumer is None:
            return
        self._consumer = consumer
        try:
            while not self._stopping:
                try:
                    await self._round(consumer)
                except Exception:  # a bug must not end the ingress silently
                    log.exception("kafka ingress %s: a round failed; going on", self.group_id)
                    await asyncio.sleep(self.options.poll_interval)
        finally:
            self._consumer = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), _STOP_GRACE)

    # -- one round: fetch, pick what may go in, insert, commit --------------------------------

    async def _round(self, consumer: AIOKafkaConsumer) -> None:
        holding = any(self._buffers.values())
        timeout = self.options.fetch_max_wait_ms if holding else int(self.options.poll_interval * 1000)
        fetched = await consumer.getmany(timeout_ms=timeout, max_records=self.options.batch_size)
        arrived = time.time() * 1000  # aiokafka's fetch timestamps use the same clock, in ms
        for tp, messages in fetched.items():
            for m in messages:
                incoming = decode(
                    m,
                    handled=self.routing.handled,
                    by_topic=self.routing.by_topic,
                    protocol=self.routing.protocol,
                )
                self._buffers[tp].append(_Pending(tp, m.offset, incoming, arrived))
        if not any(self._buffers.values()):
            return
        generation = self._generation
        await self._resolve_targets(consumer)
        picks = await self._pick(consumer)
        if picks:
            if not await self._insert(picks):
                await self._pause_held(consumer)
                await asyncio.sleep(self.options.poll_interval)
                return
            if generation == self._generation:
                await self._commit(consumer, picks)
            for p in picks:
                buffer = self._buffers.get(p.tp)
                if buffer and buffer[0] is p:
                    buffer.popleft()
        await self._pause_held(consumer)

    def _needs_order(self, p: _Pending) -> bool:
        return p.incoming.event_type in self.routing.before

    def _partitions_before(self, consumer: AIOKafkaConsumer, p: _Pending) -> tuple[TopicPartition, ...]:
        topics = self.routing.before[p.incoming.event_type or ""]
        found = [
            TopicPartition(topic, n)
            for topic in sorted(topics)
            for n in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        # Its own partition needs nothing: everything before it there is inserted before it.
        return tuple(tp for tp in found if tp != p.tp)

    async def _resolve_targets(self, consumer: AIOKafkaConsumer) -> None:
        """Fix the targets of held messages that wait on other partitions (module docstring)."""
        unresolved = [
            p for buf in self._buffers.values() for p in buf if p.targets is None and self._needs_order(p)
        ]
        if not unresolved:
            return
        wanted: set[TopicPartition] = set()
        for p in unresolved:
            p.waits_on = self._partitions_before(consumer, p)
            if p.listed is None:
                wanted.update(p.waits_on)
        if wanted:
            try:
                listed = await asyncio.wait_for(consumer.end_offsets(sorted(wanted)), _LIST_OFFSETS_TIMEOUT)
            except (KafkaError, TimeoutError) as err:
                self._kafka.failed(err)
                return
            for p in unresolved:
                if p.listed is None:
                    p.listed = {tp: int(listed.get(tp, 0)) for tp in p.waits_on}
        assignment = consumer.assignment()
        for p in unresolved:
            assert p.listed is not None
            targets: dict[TopicPartition, int] = {}
            for tp in p.waits_on:
                target = p.listed.get(tp, 0)
                if tp in assignment:
                    polled = consumer.last_poll_timestamp(tp)
                    highwater = consumer.highwater(tp)
                    if polled is None or highwater is None or polled < p.arrived_ms:
                        break  # no fetch answered since it arrived (or the partition is paused)
                    target = max(target, int(highwater))
                targets[tp] = target
            else:
                p.targets = targets

    async def _pick(self, consumer: AIOKafkaConsumer) -> list[_Pending]:
        """Messages that may go into the log now, in the order they must be inserted."""
        picks: list[_Pending] = []
        taken: dict[TopicPartition, int] = defaultdict(int)
        committed: dict[TopicPartition, int] = {}
        assignment = consumer.assignment()

        async def inserted_up_to(tp: TopicPartition) -> int:
            """Offset below which ``tp`` is in the log (or picked, to go in first)."""
            buffer = self._buffers.get(tp)
            if tp in assignment:
                if buffer and taken[tp] < len(buffer):
                    return buffer[taken[tp]].offset
                return int(await consumer.position(tp))
            if tp not in committed:  # another member of the group reads it
                committed[tp] = int(await consumer.committed(tp) or 0)
            return committed[tp]

        async def ready(p: _Pending) -> bool:
            if not self._needs_order(p):
                return True
            if p.targets is None:
                return False
            for tp, target in p.targets.items():
                if await inserted_up_to(tp) < target:
                    return False
            return True

        # Taking an A may free a B of another partition: go round until nothing moves.
        progress = True
        while progress:
            progress = False
            for tp, buffer in list(self._buffers.items()):
                while taken[tp] < len(buffer) and await ready(buffer[taken[tp]]):
                    picks.append(buffer[taken[tp]])
                    taken[tp] += 1
                    progress = True
        return picks

    async def _insert(self, picks: list[_Pending]) -> bool:
        records = [p.incoming.event for p in picks if p.incoming.event is not None]
        letters = [p.incoming.dead for p in picks if p.incoming.dead is not None]
        try:
            # The administrator: the reference protocol writes holders' columns in services'
            # schemas, which the core role may not touch.
            async with self.core.admin() as conn:
                if records:
                    # In pick order: an A picked before the B it precedes gets a smaller position.
                    with telemetry.batch_span("vmsdb ingress insert", records, {"vmsdb.count": len(records)}):
                        inserted = set(await append(conn, records, deduplicate=True))
                    if self.routing.protocol:
                        letters += await self._apply_protocol(conn, picks, inserted)
                await dead_letter_input(conn, letters)
        except (SQLAlchemyError, OSError) as err:
            self._db.failed(err)
            return False
        self._db.ok()
        self.ingested += len(records)
        self.dead_letters += len(letters)
        for letter in letters:
            log.error(
                "kafka ingress %s: %s goes to the dead letters: %s",
                self.group_id,
                letter.source,
                letter.error,
            )
        return True

    async def _apply_protocol(
        self, conn: AsyncConnection, picks: list[_Pending], inserted: set[uuid.UUID]
    ) -> list[DeadInput]:
        """Apply the new protocol events, in the transaction that records them (so once each).

        Each runs in a savepoint: one whose payload cannot be applied (a field missing, a
        refusal) becomes a dead letter and the others go on. Database errors are not its own
        fault: they fail the round, which is read again.
        """
        failed: list[DeadInput] = []
        for p in picks:
            record = p.incoming.event
            if record is None or record.type not in self.routing.protocol or record.id not in inserted:
                continue
            await conn.execute(_SAVEPOINT)
            try:
                await handle_event(conn, record.type, json.loads(record.payload))
            except (CoreError, KeyError, TypeError, ValueError) as err:
                await conn.execute(_ROLLBACK_TO_SAVEPOINT)
                source = source_of(p.tp.topic, p.tp.partition, p.offset)
                error = f"{record.type} could not be applied: {type(err).__name__}: {err}"
                failed.append(
                    DeadInput(PROTOCOL_SUBSCRIBER, record.type, record.key, record.payload, source, error)
                )
            else:
                await conn.execute(_RELEASE_SAVEPOINT)
        return failed

    async def _commit(self, consumer: AIOKafkaConsumer, picks: list[_Pending]) -> None:
        assignment = consumer.assignment()
        offsets: dict[TopicPartition, int] = {}
        for p in picks:
            if p.tp in assignment:
                offsets[p.tp] = p.offset + 1
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as err:
            # Read again later and inserted as a no-op: only progress is lost, not correctness.
            self._kafka.failed(err)
            return
        self.committed.update(offsets)
        self._kafka.ok()

    async def _pause_held(self, consumer: AIOKafkaConsumer) -> None:
        """Pause partitions whose head is held (order per partition); resume the others."""
        assignment = consumer.assignment()
        held = {tp for tp, buffer in self._buffers.items() if buffer and tp in assignment}
        paused = consumer.paused()
        if held - paused:
            consumer.pause(*(held - paused))
        if paused - held:
            consumer.resume(*(paused - held))
