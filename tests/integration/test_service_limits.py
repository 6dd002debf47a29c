"""Performance isolation (issue 17, part 3): ``ServiceLimits`` enforced by Postgres and the App.

A statement over the service's ``statement_timeout`` is cancelled by Postgres and reported
naming the service and the limit (a handler so stopped is retried, then dead-lettered); a
connection beyond the role's ``CONNECTION LIMIT`` is refused by Postgres, whoever opens it; at
most ``concurrency`` of a service's calls and handlers run at once, and the waiting ones hold no
connection.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.pool import NullPool

from dbcore.descriptor import role_for
from dbcore.errors import ConnectionLimitReached, StatementTimeout
from framework import App, Event, Inbound, Lease, LeaseGrant, Service, ServiceLimits, Transactional, session


class Nudge(Event, key="key"):
    key: str
    seconds: float


class Slowpoke(
    Service, name="lim_slowpoke", limits=ServiceLimits(statement_timeout=timedelta(milliseconds=300))
):
    @Transactional(type="RO")
    async def sleep(self, seconds: float) -> int:
        return int((await session().execute(text("SELECT pg_sleep(:s), 1"), {"s": seconds})).one()[1])

    @Inbound(Nudge, max_attempts=2)
    @Transactional(type="RW")
    async def on_nudge(self, nudge: Nudge) -> None:
        await session().execute(text("SELECT pg_sleep(:s)"), {"s": nudge.seconds})
        session().add(Done(key=nudge.key))


class Done(Slowpoke.Model):
    __tablename__ = "done"
    key: Mapped[str] = mapped_column(primary_key=True)


class Crowded(Service, name="lim_crowded", limits=ServiceLimits(connections=2)):
    @Transactional(type="RO")
    async def one(self) -> int:
        return int((await session().execute(text("SELECT 1"))).scalar_one())


class Bump(Event, key="key"):
    key: str


class Capped(Service, name="lim_capped", limits=ServiceLimits(concurrency=2)):
    running = 0
    most = 0
    most_checked_out = 0

    async def _busy(self) -> None:
        cls = type(self)
        cls.running += 1
        cls.most = max(cls.most, cls.running)
        pool = self._vms_runtime.host.core.service_engine("lim_capped").pool  # type: ignore[attr-defined]
        cls.most_checked_out = max(cls.most_checked_out, pool.checkedout())
        try:
            await session().execute(text("SELECT pg_sleep(0.05)"))
        finally:
            cls.running -= 1

    @Transactional(type="RW")
    async def work(self) -> None:
        await self._busy()

    @Inbound(Bump)
    @Transactional(type="RW")
    async def on_bump(self, bump: Bump) -> None:
        await self._busy()


class Hog(Service, name="lim_hog", limits=ServiceLimits(concurrency=2)):
    finished = 0

    @Inbound(Bump)
    @Transactional(type="RW")
    async def on_bump(self, bump: Bump) -> None:
        await session().execute(text("SELECT pg_sleep(1.0)"))
        type(self).finished += 1


class Ping(Event, key="key"):
    key: str


class Neighbour(Service, name="lim_neighbour"):
    hog_finished_before: list[int] = []

    @Inbound(Ping)
    @Transactional(type="RW")
    async def on_ping(self, ping: Ping) -> None:
        type(self).hog_finished_before.append(Hog.finished)


class Depot(Service, name="lim_depot", limits=ServiceLimits(concurrency=1)):
    order: list[str] = []

    @Lease("FROM Shelf s WHERE s.sku = :sku FOR UPDATE DECREMENT s.on_hand BY :qty WITH PERIOD :period")
    async def hold(self, sku: str, qty: int, period: timedelta) -> LeaseGrant | None: ...

    @Transactional(type="RW")
    async def stock(self, sku: str, on_hand: int) -> None:
        session().add(Shelf(sku=sku, on_hand=on_hand))

    @Transactional(type="RO")
    async def busy(self) -> None:
        type(self).order.append("busy started")
        await session().execute(text("SELECT pg_sleep(0.3)"))
        type(self).order.append("busy ended")


class Shelf(Depot.Model):
    __tablename__ = "shelves"
    sku: Mapped[str] = mapped_column(primary_key=True)
    on_hand: Mapped[int]


async def _role_settings(app: App, role: str) -> tuple[int, list[str]]:
    async with app.core.admin() as conn:
        limit = (
            await conn.execute(text("SELECT rolconnlimit FROM pg_roles WHERE rolname = :r"), {"r": role})
        ).scalar_one()
        settings = (
            await conn.execute(
                text(
                    "SELECT unnest(setconfig) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                    "WHERE r.rolname = :r AND s.setdatabase = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"r": role},
            )
        ).scalars().all()
    return int(limit), list(settings)


async def test_a_direct_call_over_the_statement_timeout_names_the_service_and_limit(
    vmsdb_app_factory,
) -> None:
    async with vmsdb_app_factory([Slowpoke]) as app:
        assert "statement_timeout=300ms" in (await _role_settings(app, "vms_lim_slowpoke"))[1]
        assert await app.service(Slowpoke).sleep(0.0) == 1
        with pytest.raises(StatementTimeout) as raised:
            await app.service(Slowpoke).sleep(2.0)
        assert raised.value.service == "lim_slowpoke" and raised.value.limit_ms == 300
        assert "'lim_slowpoke'" in str(raised.value) and "300 ms" in str(raised.value)
        assert isinstance(raised.value, TimeoutError)
        assert await app.service(Slowpoke).sleep(0.0) == 1  # the pool's connection works on


async def test_a_handler_over_the_statement_timeout_is_retried_then_dead_lettered(vmsdb_app_factory) -> None:
    async with vmsdb_app_factory([Slowpoke]) as app:
        await app.publish(Nudge(key="slow", seconds=2.0))
        await app.publish(Nudge(key="quick", seconds=0.0))
        await app.drain(timeout=60)
        async with app.core.admin() as conn:
            done = (await conn.execute(text("SELECT key FROM lim_slowpoke.done"))).scalars().all()
            letter = (await conn.execute(text("SELECT * FROM vms.dead_letters"))).one()
        assert done == ["quick"]
        assert (letter.subscriber, letter.key, letter.attempts) == ("lim_slowpoke", "slow", 2)
        assert "StatementTimeout" in letter.error
        assert "'lim_slowpoke'" in letter.error and "statement_timeout limit (300 ms)" in letter.error


async def test_a_connection_flood_beyond_the_limit_is_refused_by_postgres(vmsdb_app_factory) -> None:
    async with vmsdb_app_factory([Crowded]) as app:
        assert (await _role_settings(app, "vms_lim_crowded"))[0] == 2
        await app.core.service_engine("lim_crowded").dispose()  # the App holds none now
        # Another process of the same service (its own login, not through this App's pool).
        other = create_async_engine(app.core.login_url(role_for("lim_crowded")), poolclass=NullPool)
        held: list[AsyncConnection] = []
        try:
            for _ in range(2):
                held.append(await other.connect())
            with pytest.raises(Exception, match="too many connections for role"):
                await other.connect()  # Postgres itself refuses the third
            with pytest.raises(ConnectionLimitReached) as raised:
                await app.service(Crowded).one()
            assert raised.value.service == "lim_crowded" and raised.value.limit == 2
            assert "'lim_crowded'" in str(raised.value) and "connections limit (2)" in str(raised.value)
        finally:
            for conn in held:
                await conn.close()
            await other.dispose()
        assert await app.service(Crowded).one() == 1


async def test_at_most_concurrency_calls_and_handlers_run_and_waiters_hold_no_connection(
    vmsdb_app_factory,
) -> None:
    Capped.running = Capped.most = Capped.most_checked_out = 0
    async with vmsdb_app_factory([Capped], worker_concurrency=6) as app:
        for i in range(12):
            await app.publish(Bump(key=f"b{i}"))
        await asyncio.gather(*(app.service(Capped).work() for _ in range(12)))
        await app.drain(timeout=60)
    assert Capped.most == 2
    assert Capped.most_checked_out <= 2


async def test_limits_removed_reset_the_role(vmsdb_app_factory) -> None:
    async with vmsdb_app_factory([Slowpoke]) as app:
        assert "statement_timeout=300ms" in (await _role_settings(app, "vms_lim_slowpoke"))[1]

    class Unlimited(Service, name="lim_slowpoke"):
        @Transactional(type="RO")
        async def sleep(self, seconds: float) -> int:
            return int((await session().execute(text("SELECT pg_sleep(:s), 1"), {"s": seconds})).one()[1])

    async with vmsdb_app_factory([Unlimited]) as app:
        limit, settings = await _role_settings(app, "vms_lim_slowpoke")
        assert limit == -1 and not any(s.startswith("statement_timeout") for s in settings)
        assert await app.service(Unlimited).sleep(0.5) == 1


async def test_a_capped_service_waiting_for_slots_leaves_the_workers_to_others(vmsdb_app_factory) -> None:
    Hog.finished, Neighbour.hog_finished_before = 0, []
    async with vmsdb_app_factory([Hog, Neighbour], worker_concurrency=4) as app:
        for i in range(8):
            await app.publish(Bump(key=f"h{i}"))
        hog_pool = app.core.service_engine("lim_hog").pool
        for _ in range(200):  # until the hog runs its two
            if hog_pool.checkedout() == 2:
                break
            await asyncio.sleep(0.01)
        await app.publish(Ping(key="p"))
        await app.drain(timeout=60)
    # The neighbour's handler did not wait for a hog's slot: the hog's other six waited without
    # a worker (a worker blocked on the hog's pool would have left it none until one finished).
    assert Neighbour.hog_finished_before == [0]
    assert Hog.finished == 8


async def test_an_app_stops_while_a_capped_services_deliveries_wait_for_slots(vmsdb_database: str) -> None:
    Hog.finished = 0
    app = await App([Hog], database_url=vmsdb_database, create_tables=True, worker_concurrency=4).start()
    try:
        for i in range(8):
            await app.publish(Bump(key=f"s{i}"))
        hog_pool = app.core.service_engine("lim_hog").pool
        for _ in range(200):  # two run; the other workers wait for a slot
            if hog_pool.checkedout() == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await asyncio.wait_for(app.stop(), timeout=30)  # the waiting workers are woken to stop
    assert Hog.finished < 8  # it stopped with deliveries still waiting (claimed again later)


async def test_a_lease_call_of_a_capped_service_waits_for_its_slot(vmsdb_app_factory) -> None:
    # A lease granted in a transaction of the owner's own counts against its concurrency.
    Depot.order = []
    async with vmsdb_app_factory([Depot]) as app:
        depot = app.service(Depot)
        await depot.stock("a", 5)
        busy = asyncio.create_task(depot.busy())
        for _ in range(300):  # until the call holds the service's one slot
            if Depot.order == ["busy started"]:
                break
            await asyncio.sleep(0.01)
        granted = await depot.hold("a", 2, timedelta(minutes=1))
        Depot.order.append("lease granted")
        await busy
    assert granted is not None
    assert Depot.order == ["busy started", "busy ended", "lease granted"]
