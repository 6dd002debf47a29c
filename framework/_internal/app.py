"""``App``: the running group of services, connected to one core.

```python
async with App([Stock, Cart], create_tables=True) as app:   # no URL: embedded Postgres
    await app.publish(AddCartItemRequest(customer_id="c1", item_id="i1", qty=2))
    await app.drain()
```

Start-up scans the service classes into descriptors (every annotation mistake is an
``AnnotationError`` here, before anything touches the database), connects, installs the catalog,
registers the descriptors, optionally creates tables, and starts one dispatcher per service that
has ``@Inbound`` handlers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore import delivery
from dbcore.core import Core, PoolSize, connection_budget
from dbcore.descriptor import LimitsDescriptor, ServiceDescriptor
from dbcore.eventlog import append
from dbcore.translate import translated
from framework._internal import epochs, telemetry
from framework._internal.config import Settings
from framework._internal.context import correlation
from framework._internal.descriptors import ServicePlan, build_plans, dependencies_of
from framework._internal.dispatcher import Claims, Dispatcher
from framework._internal.errors import FrameworkError
from framework._internal.events import Event
from framework._internal.handoff import HandOff
from framework._internal.host import Database, Host
from framework._internal.housekeeping import Housekeeping, read_recovering
from framework._internal.leases import LeaseExecutor
from framework._internal.listener import Listener
from framework._internal.metrics import Metrics
from framework._internal.outbox import record_of
from framework._internal.outcomes import OutcomeWatcher
from framework._internal.runtime import ServiceHandle, ServiceRuntime
from framework._internal.service import Service
from framework._internal.workers import HandlerWorkers

__all__ = ["App"]

log = logging.getLogger("vmsdb.app")

#: Connections left to the administrator's pool, the listener, commands and other clients when
#: the pools are sized to the server's budget.
_ADMIN_HEADROOM = 10

S = TypeVar("S", bound=Service)


class App:
    """A group of services on one core. Use as ``async with App([...]) as app``.

    ``workers``: run the ``@Inbound`` handlers of every service (``True``), of none (``False``),
    or of the named services only; several processes may run the same handlers.

    Schemas: by default the App refuses to start unless the core and every service schema are
    at their migration head (``vmsdb migrate``). ``migrate=True`` migrates on start
    (development); ``create_tables=True`` creates missing tables without migrations (tests).
    """

    def __init__(
        self,
        services: Iterable[type[Service]],
        *,
        database_url: str | None = None,
        create_tables: bool = False,
        migrate: bool = False,
        workers: bool | Iterable[str] = True,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        self.services: list[type[Service]] = list(services)
        base = settings or Settings()
        if database_url is not None:
            overrides["database_url"] = database_url
        self.settings = base.model_copy(update=overrides) if overrides else base
        self.create_tables = create_tables
        self.migrate = migrate
        self.workers: bool | frozenset[str] = workers if isinstance(workers, bool) else frozenset(workers)
        self.metrics = Metrics()
        self._leases: LeaseExecutor | None = None
        self.plans: list[ServicePlan] = build_plans(self.services)
        if isinstance(self.workers, frozenset):
            unknown = self.workers - {p.descriptor.name for p in self.plans}
            if unknown:
                raise FrameworkError(f"workers= names services not in this App: {', '.join(sorted(unknown))}")
        self._database = Database(self.settings)
        self._host: Host | None = None
        self._runtimes: dict[type[Service], ServiceRuntime] = {}
        self._dispatchers: dict[str, Dispatcher] = {}
        self._listener: Listener | None = None
        self._outcomes = OutcomeWatcher(self._autocommit)
        self._housekeeping: Housekeeping | None = None
        self._started = False
        self._kafka: Any = None
        self._workers: HandlerWorkers | None = None
        #: Pool of each service's login, and of the housekeeping login (None): _size_pools.
        self._pools: dict[str | None, PoolSize] = {}
        #: Services recovering in consistency mode (G10): they serve nothing until it ends.
        self.recovering: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def host(self) -> Host:
        """What the App's running parts share (core, settings, plans, metrics, recovery)."""
        if self._host is None:
            raise FrameworkError("the App is not started; use `async with App(...) as app`")
        return self._host

    @property
    def core(self) -> Core:
        return self.host.core

    @property
    def leases(self) -> LeaseExecutor:
        """Settle leases outside any transaction: ``await app.leases.consume(grant)``."""
        if self._leases is None:
            raise FrameworkError("the App is not started; use `async with App(...) as app`")
        return self._leases

    @property
    def kafka(self) -> Any:
        """The Kafka transport (relay and ingress) when ``kafka_bootstrap`` is set, else ``None``."""
        return self._kafka

    @property
    def descriptors(self) -> list[ServiceDescriptor]:
        return [p.descriptor for p in self.plans]

    @property
    def database_url(self) -> str:
        return str(self.core.engine.url.render_as_string(hide_password=False))

    async def start(self) -> App:
        # Every running handler holds a connection (at most worker_concurrency of them, over all
        # services), and claims, outcome checks and direct calls need some more: a pool smaller
        # than that would open and close overflow connections all the time.
        telemetry.configure()
        telemetry.install_log_fields()
        try:
            # The administrator's pool serves start-up and commands only: services and the
            # housekeeping have pools of their own logins (use_logins below).
            core = await self._database.open(pool_size=2)
            self._host = Host(core, self.settings, self.plans, self.metrics, self.recovering)
            self._leases = LeaseExecutor(self._host)
            from framework._internal import migrations  # lazy: keeps alembic out of import time

            if self.migrate:  # development: the core and every service schema to head
                await migrations.migrate(self)
            elif self.create_tables:  # development and tests without revisions
                await core.install()
            else:  # production: refuse to start unless every history is at head
                await migrations.ensure_at_head(self)
            await core.register(
                self.descriptors,
                idle_timeout_ms=round(self.settings.idle_transaction_timeout * 1000),
            )
            async with core.admin() as conn:
                self._size_pools(await connection_budget(conn))
            await core.use_logins(core_pool=self._pools[None], service_pool=self._service_pool)
            if self.create_tables:
                await self._create_tables()
            await self._install_references()
            self._attach()
            await self._listen()
            if self.settings.kafka_bootstrap:
                from framework._internal.kafka import KafkaTransport  # imported only when Kafka is on

                self._kafka = KafkaTransport(self.host)
                await self._kafka.start()
            if self.workers:
                self._start_workers()
            self._housekeeping = Housekeeping(self.host, self._wake, prune_log=bool(self.workers))
            self._housekeeping.start()
        except BaseException:
            await self._shutdown()
            raise
        self._started = True
        return self

    def _size_pools(self, budget: int) -> None:
        """Each login's pool: as many connections as it can use at once, all of them kept once
        opened (an overflow connection closed on return is a new session, and a SCRAM
        handshake, at the next burst); shrunk in proportion when the server's connection
        budget, shared by ``processes`` processes, cannot hold them all.

        The housekeeping login (claims, one per dispatcher, retries, dead letters, publish and
        outcome lookups: short statements, but an HTTP burst publishes and waits many at
        once) needs ``pool_size`` + 10. A service's login needs ``worker_concurrency`` (all
        services together share that many handler workers) plus 4 for its direct calls,
        bounded by ``ServiceLimits(concurrency=, connections=)`` (a role's connection limit
        counts every process's: with several processes, give each a share). Pools open
        connections on demand: a service that never gets busy holds few.
        """
        wanted: dict[str | None, int] = {None: self.settings.pool_size + 10}  # None: housekeeping
        for descriptor in self.descriptors:
            needed = self.settings.worker_concurrency + 4
            limits = descriptor.limits
            if limits.concurrency is not None:
                needed = min(needed, limits.concurrency)
            if limits.connections is not None:
                needed = min(needed, limits.connections)
            wanted[descriptor.name] = needed
        # Headroom for the administrator's pool, LISTEN, commands and other clients.
        share = max(0, budget - _ADMIN_HEADROOM) // self.settings.processes
        total = sum(wanted.values())
        if total > share:
            log.info(
                "connection pools scaled to %d of the %d connections they could use: the server "
                "admits %d, shared by %d process(es) (raise max_connections, or lower "
                "worker_concurrency)",
                share, total, budget, self.settings.processes,
            )  # fmt: skip
            wanted = {login: max(2, needed * share // total) for login, needed in wanted.items()}
        self._pools = {login: PoolSize(size, 0) for login, size in wanted.items()}

    def _service_pool(self, service: str) -> PoolSize:
        return self._pools.get(service) or PoolSize(2, 0)

    def _limits_of(self, service: str) -> LimitsDescriptor:
        found = next((d.limits for d in self.descriptors if d.name == service), None)
        return found if found is not None else LimitsDescriptor()

    def _start_workers(self) -> None:
        # One set of workers runs the handlers of every service: at most worker_concurrency
        # handlers (and pooled connections) at once.
        slots = {rt.name: rt.slots for rt in self._runtimes.values() if rt.slots is not None}
        self._workers = HandlerWorkers(self.core, self.settings.worker_concurrency, slots)
        self._workers.start()
        chosen_names = self.workers
        claims = Claims(self.host)  # the dispatchers' claims, together
        for runtime in self._runtimes.values():
            chosen = chosen_names is True or (
                isinstance(chosen_names, frozenset) and runtime.name in chosen_names
            )
            descriptor = runtime.plan.descriptor
            if chosen and (
                descriptor.inbound or any(r.consistency == "eventual" for r in descriptor.replicas)
            ):
                dispatcher = Dispatcher(self.host, runtime, self._workers, claims)
                self._dispatchers[runtime.name] = dispatcher
                dispatcher.start()
        if self._dispatchers:
            self.host.handoff = HandOff(self._dispatchers)

    async def _create_tables(self) -> None:
        """Create missing tables, owned by each service's role (development and tests)."""
        for plan in self.plans:
            async with self.core.transaction(plan.descriptor.name) as conn:
                await conn.run_sync(plan.cls.Model.metadata.create_all)
        await self.core.sync_grants(self.descriptors)

    async def _install_references(self) -> None:
        """Referenceable tables and reference columns (G9, G10), once the tables exist."""
        if any(d.declares_references for d in self.descriptors):
            from framework import references  # lazy: only Apps that declare references need it

            await references.install(self)

    def _attach(self) -> None:
        for plan in self.plans:
            self._runtimes[plan.cls] = ServiceRuntime(self.host, plan, self.leases)
        by_name = {cls.service_name(): rt for cls, rt in self._runtimes.items()}
        for cls, runtime in self._runtimes.items():
            for attr, dep in dependencies_of(cls).items():
                setattr(runtime.instance, attr, ServiceHandle(runtime.name, by_name[dep.service_name()]))

    async def stop(self) -> None:
        await self._shutdown()
        self._started = False

    async def _shutdown(self) -> None:
        if self._kafka is not None:
            await self._kafka.stop()
            self._kafka = None
        if self._host is not None:
            self._host.handoff = None  # from now on, every event is claimed by its dispatcher
        for dispatcher in self._dispatchers.values():
            await dispatcher.stop()
        if self._workers is not None:
            await self._workers.stop()
            self._workers = None
        self._dispatchers.clear()
        if self._housekeeping is not None:
            await self._housekeeping.stop()
            self._housekeeping = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._outcomes.close()
        await self._database.close()
        self._host = None
        self._leases = None

    async def __aenter__(self) -> App:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- services ----------------------------------------------------------------------------

    def service(self, cls: type[S]) -> S:
        """The running instance of service class ``cls``; call its functions directly."""
        runtime = self._runtimes.get(cls)
        if runtime is None:
            known = ", ".join(c.__name__ for c in self.services)
            raise FrameworkError(f"{cls.__name__} is not a started service of this App ({known})")
        return runtime.instance  # type: ignore[return-value]

    def _autocommit(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self.core.housekeeping_autocommit()

    def correlation_id(self) -> str | None:
        return correlation.get()

    # -- events ------------------------------------------------------------------------------

    async def publish(
        self, event: Event, *, correlation_id: str | None = None, event_id: uuid.UUID | None = None
    ) -> uuid.UUID:
        """Put ``event`` on the log from outside any service (an HTTP request, a test).

        Publishing the same ``event_id`` twice delivers it once.
        """
        record = record_of(
            event,
            producer=None,
            correlation_id=correlation_id or correlation.get(),
            causation_id=None,
            event_id=event_id,
        )
        with translated():  # the database away: CoreUnavailable
            async with self.core.housekeeping() as conn:
                await append(conn, [record], deduplicate=True)
        return record.id

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every event pending for this App's services is handled or dead-lettered."""
        if not self._dispatchers and any(any(s.inbound for s in p.functions.values()) for p in self.plans):
            raise FrameworkError("drain() needs the App's workers; it was started with workers=False")
        subscribers = list(self._dispatchers)
        deadline = time.monotonic() + timeout
        while True:
            async with self.core.housekeeping() as conn:
                pending = await delivery.pending_count(conn, subscribers)
            if pending == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"drain(): {pending} deliveries still pending after {timeout} s")
            await asyncio.sleep(0.01)

    async def outcome(self, correlation_id: str, *event_types: type[Event], timeout: float = 30.0) -> Event:
        """The first event of one of ``event_types`` produced in ``correlation_id``'s chain.

        Raises ``TimeoutError`` naming the correlation when none arrives within ``timeout``.
        """
        return await self._outcomes.wait(correlation_id, event_types, timeout)

    # -- notifications -----------------------------------------------------------------------

    async def _listen(self) -> None:
        self._listener = Listener(self.core, self._on_events, self._on_recovery, self._on_reconnect)
        await self._listener.open()
        # Listening first, then reading: a recovery that starts in between is not missed.
        self.recovering.update(await read_recovering(self.host))
        await epochs.load_amnesia(self.host)

    def _on_reconnect(self) -> None:
        """Notifications sent while the listener was away are lost: look again at everything
        that waits on one (claimable deliveries, outcomes, the recovery state)."""
        for name in self._dispatchers:
            self._wake(name)
        self._outcomes.notified(None)
        if self._housekeeping is not None:
            self._housekeeping.recheck_recovery()

    def _on_events(
        self, subscribers: Iterable[str], committed: Mapping[str, frozenset[str] | None] | None
    ) -> None:
        for name in subscribers:
            self._wake(name)
        self._outcomes.notified(committed)

    def _on_recovery(self, service: str, mode: str) -> None:
        self.host.amnesia.add(service)  # a restore (or a merge) leaves entities to be read
        if mode == "consistency":
            self.recovering.add(service)
            return
        self.recovering.discard(service)
        self._wake(service)

    def _wake(self, service: str) -> None:
        dispatcher = self._dispatchers.get(service)
        if dispatcher is not None:
            dispatcher.wake()
