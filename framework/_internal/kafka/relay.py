"""The outbox relay: this core's committed events, published to Kafka in log order.

Loop: read a batch below the snapshot horizon after the cursor (``dbcore.relay``), send it, wait
for the broker's acknowledgements (``acks=all``), then move the cursor past it. Nothing is
skipped and nothing moves on before Kafka has it; a crash between the acknowledgement and the
cursor update publishes the batch again (at least once; the consumers' inbox drops duplicates).

Ordering, and why it holds:

- One relay publishes at a time (a Postgres advisory lock on its own connection; standbys retry
  every ``_STANDBY_RETRY`` seconds and take over when the holder's connection closes).
- It sends in ``(xid, position)`` order through one producer, and a message's key is the event's
  partition key, so one key always lands in one partition. aiokafka keeps a partition's messages
  in order: its sender has at most one produce request in flight per partition (it "mutes" the
  partition until the answer) and puts a batch that must be retried back at the *head* of that
  partition's queue. Messages are appended to the producer without yielding to the event loop
  (topic metadata is fetched first), and a batch is kept below the producer's batch size, so the
  messages one batch sends to one partition travel in a single produce batch that is
  acknowledged or failed as a whole; after a failure the next attempt re-reads from the cursor.
- Precedence across topics: a batch is sent in runs of one event type, and a run goes out only
  after the previous run is acknowledged. So when a message of type B is in Kafka, every event
  of another type committed before it is in Kafka too -- what the ingress of another core relies
  on to hold ``@Inbound(A, precedence=B)`` (see ``ingress.py``). The next batch is read only
  after the whole batch is acknowledged, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from dbcore import relay as relay_log
from dbcore.eventlog import NOTIFY_CHANNEL
from dbcore.relay import Cursor, LogRow
from framework._internal import telemetry
from framework._internal.kafka.codec import encode
from framework._internal.kafka.health import Outage
from framework._internal.kafka.options import KafkaOptions

__all__ = ["Relay"]

log = logging.getLogger("vmsdb.kafka.relay")

_STANDBY_RETRY = 0.5
_FIRST_POLL = 0.005
_STOP_GRACE = 5.0
_MAX_BACKOFF = 5.0


class Relay:
    """Publishes the committed events of the core at ``database_url`` to Kafka."""

    def __init__(self, database_url: URL | str, options: KafkaOptions) -> None:
        self.options = options
        self.name = options.relay_name
        self.published = 0
        self.leader = False
        self._url = database_url
        self._engine: AsyncEngine | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        self._kafka = Outage(log, f"kafka relay {self.name!r}: Kafka")
        self._db = Outage(log, f"kafka relay {self.name!r}: the database")

    async def start(self) -> None:
        # Its own connections, outside the App's pool: the lock lives as long as the session.
        self._engine = create_async_engine(self._url, poolclass=NullPool)
        self._task = asyncio.create_task(self._run(), name=f"vmsdb-kafka-relay-{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        self._wake.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=_STOP_GRACE)
            if not done:  # stuck waiting for a broker that does not answer
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    # -- leadership ------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._engine is not None
        while not self._stopping:
            try:
                async with self._engine.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    self._db.ok()
                    if await self._acquire(conn):
                        await self._listen(conn)
                        await self._lead(conn)
            except (SQLAlchemyError, OSError) as err:
                self._db.failed(err)
                await self._pause(self._backoff(self._db.failures))
            except Exception:  # a bug must not end the relay silently
                log.exception("kafka relay %r failed; restarting it", self.name)
                await self._pause(self.options.poll_interval)
            finally:
                self.leader = False

    async def _listen(self, conn: AsyncConnection) -> None:
        """Wake on the core's NOTIFY (sent at the commit of every event insert)."""
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())

    async def _acquire(self, conn: AsyncConnection) -> bool:
        announced = False
        while not self._stopping:
            if await relay_log.try_lock(conn, self.name):
                self.leader = True
                return True
            if not announced:
                log.info("kafka relay %r: another process publishes; standing by", self.name)
                announced = True
            await self._pause(_STANDBY_RETRY)
        return False

    async def _lead(self, conn: AsyncConnection) -> None:
        producer = await self._start_producer()
        if producer is None:
            return
        try:
            cursor = await relay_log.cursor(conn, self.name)
            log.info("kafka relay %r: publishing from %s", self.name, cursor)
            await self._publish_loop(conn, producer, cursor)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), _STOP_GRACE)

    async def _start_producer(self) -> AIOKafkaProducer | None:
        while not self._stopping:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.options.bootstrap,
                client_id=f"vmsdb-relay-{self.name}",
                acks="all",
                enable_idempotence=self.options.idempotent,
                linger_ms=0,
                max_batch_size=max(2 * self.options.batch_bytes, 1024 * 1024),
                max_request_size=max(4 * self.options.batch_bytes, 1024 * 1024),
            )
            try:
                await producer.start()
            except KafkaError as err:
                with contextlib.suppress(Exception):
                    await producer.stop()
                self._kafka.failed(err)
                await self._pause(self._backoff(self._kafka.failures))
                continue
            return producer
        return None

    # -- publishing ------------------------------------------------------------------------

    async def _publish_loop(self, conn: AsyncConnection, producer: AIOKafkaProducer, cursor: Cursor) -> None:
        idle = _FIRST_POLL
        while not self._stopping:
            rows = await relay_log.read_batch(conn, cursor, self.options.batch_size)
            if not rows:
                woke = await self._sleep(idle)
                # Woken but nothing readable: an older transaction still holds the horizon back;
                # look again soon, backing off to the poll interval.
                idle = _FIRST_POLL if woke else min(idle * 2, self.options.poll_interval)
                continue
            idle = _FIRST_POLL
            rows = self._within_budget(rows)
            if not await self._publish(producer, rows, cursor):
                await self._pause(self._backoff(self._kafka.failures))
                continue  # the same batch again, from the same cursor
            cursor = rows[-1].cursor
            await relay_log.advance(conn, self.name, cursor)

    def _within_budget(self, rows: list[LogRow]) -> list[LogRow]:
        size = 0
        for i, row in enumerate(rows):
            size += len(row.payload or "")
            if size > self.options.batch_bytes and i > 0:
                return rows[:i]
        return rows

    async def _publish(self, producer: AIOKafkaProducer, rows: list[LogRow], cursor: Cursor) -> bool:
        """Send ``rows`` and wait for every acknowledgement; ``False`` if Kafka failed them."""
        relayed = [r for r in rows if r.relay]
        if not relayed:
            return True  # only events from elsewhere: pass over them
        task = asyncio.ensure_future(self._send(producer, relayed))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.options.stall_warning)
            if not done:
                self._kafka.failed(
                    f"no acknowledgement for {self.options.stall_warning:g} s; holding {len(relayed)} "
                    f"events after cursor {cursor} until Kafka answers"
                )
                await asyncio.wait({task})
            task.result()
        except KafkaError as err:
            self._kafka.failed(err)
            return False
        finally:
            if not task.done():
                task.cancel()
        self._kafka.ok()
        self.published += len(relayed)
        return True

    async def _send(self, producer: AIOKafkaProducer, rows: list[LogRow]) -> None:
        with telemetry.batch_span("vmsdb relay publish", rows, {"messaging.batch.message_count": len(rows)}):
            await self._send_runs(producer, rows)

    async def _send_runs(self, producer: AIOKafkaProducer, rows: list[LogRow]) -> None:
        # One run per event type, each acknowledged before the next goes out (module docstring).
        for _, run in itertools.groupby(rows, key=lambda r: r.type):
            messages = [encode(r, self.options.topic_for(r.type)) for r in run]
            for topic in dict.fromkeys(m.topic for m in messages):
                await producer.partitions_for(topic)  # metadata first: the sends below never yield
            futures = [await producer.send(m.topic, m.value, key=m.key, headers=m.headers) for m in messages]
            results = await asyncio.gather(*futures, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    def _backoff(self, failures: int) -> float:
        return float(min(self.options.poll_interval * 2 ** max(failures - 1, 0), _MAX_BACKOFF))

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless stopped; new events do not shorten it (retries, standby)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, less if woken; ``True`` if woken."""
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)
        woke = self._wake.is_set()
        self._wake.clear()
        return woke
