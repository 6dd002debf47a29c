"""G7: leases never oversell, expire without a process, and settle atomically and idempotently."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from uuid import UUID, uuid4

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Mapped, mapped_column

from dbcore import leases
from dbcore.errors import LeaseNotFound
from framework import (
    App,
    IsolationError,
    Lease,
    LeaseConsumed,
    LeaseExpired,
    LeaseGrant,
    LeaseReleased,
    Service,
    Transactional,
    consume_lease,
    consume_leases,
    release_lease,
    release_leases,
    renew_lease,
    session,
)
from framework.testing import advance_clock

from .statements import statements_sent


class Warehouse(Service, name="warehouse"):
    @Lease(
        "FROM Bin b WHERE b.seller = :seller AND b.sku = :sku "
        "FOR UPDATE DECREMENT b.on_hand BY :qty WITH PERIOD :period"
    )
    async def hold(self, seller: int, sku: str, qty: int, period: timedelta) -> LeaseGrant | None: ...

    @Transactional
    async def stock(self, seller: int, sku: str, on_hand: int, price: int = 10) -> None:
        session().add(Bin(seller=seller, sku=sku, on_hand=on_hand, price=price))

    @Transactional(type="RO")
    async def on_hand(self, seller: int, sku: str) -> int:
        row = await session().get(Bin, (seller, sku))
        assert row is not None
        return row.on_hand


@Warehouse.export
class Bin(Warehouse.Model):
    __tablename__ = "bins"
    seller: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(primary_key=True)
    on_hand: Mapped[int]
    price: Mapped[int]


class Basket(Service, name="basket"):
    warehouse: Warehouse

    @Transactional(type="RW")
    async def reserve(self, sku: str, qty: int, *, fail: bool = False) -> LeaseGrant | None:
        grant = await self.warehouse.hold(1, sku, qty, timedelta(minutes=10))
        if grant is not None:
            session().add(Line(lease_id=str(grant.id), sku=sku, qty=qty))
        if fail:
            raise RuntimeError("basket failed after taking the lease")
        return grant

    @Transactional(type="RW")
    async def checkout(self, lease: LeaseGrant) -> None:
        await consume_lease(lease)
        session().add(Line(lease_id=f"sold-{lease.id}", sku="sold", qty=int(lease.quantity)))

    @Transactional(type="RW")
    async def cancel(self, lease: LeaseGrant) -> None:
        await release_lease(lease)

    @Transactional(type="RW")
    async def extend(self, lease: LeaseGrant, period: timedelta) -> None:
        await renew_lease(lease, period)

    @Transactional(type="RW")
    async def run_in_transaction(self, body: Callable[[], Awaitable[str]]) -> str:
        return await body()

    @Transactional(type="RW")
    async def tamper(self) -> None:
        await session().execute(text("UPDATE warehouse.bins SET on_hand = on_hand + 100"))


class Line(Basket.Model):
    __tablename__ = "lines"
    lease_id: Mapped[str] = mapped_column(primary_key=True)
    sku: Mapped[str]
    qty: Mapped[int]


@pytest.fixture
def vmsdb_services():
    return [Warehouse, Basket]


async def active_held(app: App, sku: str) -> int:
    async with app.core.admin() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "SELECT coalesce(sum(quantity), 0) FROM vms.leases WHERE key->>'sku' = :sku "
                        "AND status = 'active' AND expires_at > vms.now()"
                    ),
                    {"sku": sku},
                )
            ).scalar_one()
        )


async def test_200_concurrent_callers_never_get_more_than_50_units(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "hot", 50)
    basket = vmsdb_app.service(Basket)
    grants = await asyncio.gather(*(basket.reserve("hot", 1) for _ in range(200)))
    granted = [g for g in grants if g is not None]
    assert len(granted) == 50
    held = await active_held(vmsdb_app, "hot")
    on_hand = await vmsdb_app.service(Warehouse).on_hand(1, "hot")
    # Units granted plus units left equal the starting quantity.
    assert held == 50 and on_hand - held == 0
    assert vmsdb_app.metrics.value("lease_grants") == 50 and vmsdb_app.metrics.value("lease_refusals") == 150


async def test_mixed_quantities_race_conserves_stock(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "mix", 37)
    basket = vmsdb_app.service(Basket)
    grants = await asyncio.gather(*(basket.reserve("mix", 1 + i % 4) for i in range(120)))
    granted = sum(int(g.quantity) for g in grants if g is not None)
    assert granted <= 37
    assert granted + (37 - await active_held(vmsdb_app, "mix")) == 37
    # Nothing that fits is left unsold: any remaining amount is smaller than every refused ask.
    assert 37 - granted < 1 + min(i % 4 for i, g in enumerate(grants) if g is None)


async def test_grant_carries_the_rows_values(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "v", 5, price=42)
    grant = await vmsdb_app.service(Basket).reserve("v", 2)
    assert grant is not None
    assert grant.values == {"seller": 1, "sku": "v", "on_hand": 5, "price": 42}
    assert grant.key == {"seller": 1, "sku": "v"} and grant.available == 3 and grant.quantity == 2


async def test_expiry_gives_the_quantity_back_with_no_process(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "e", 3)
    basket = vmsdb_app.service(Basket)
    first = await basket.reserve("e", 3)
    assert first is not None
    assert await basket.reserve("e", 1) is None
    await advance_clock(vmsdb_app, timedelta(minutes=11))
    second = await basket.reserve("e", 3)
    assert second is not None
    async with vmsdb_app.core.admin() as conn:
        status = (
            await conn.execute(text("SELECT status FROM vms.leases WHERE id = :i"), {"i": first.id})
        ).scalar_one()
    assert status == "expired"


async def test_consume_after_expiry_fails_and_changes_nothing(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "x", 4)
    basket = vmsdb_app.service(Basket)
    grant = await basket.reserve("x", 2)
    assert grant is not None
    await advance_clock(vmsdb_app, timedelta(minutes=11))
    with pytest.raises(LeaseExpired, match="expired"):
        await basket.checkout(grant)
    assert await vmsdb_app.service(Warehouse).on_hand(1, "x") == 4
    async with vmsdb_app.core.admin() as conn:
        sold = (await conn.execute(select(Line).where(Line.sku == "sold"))).all()
    assert sold == []


async def test_consume_is_atomic_with_the_caller_and_idempotent(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "c", 4)
    basket = vmsdb_app.service(Basket)
    grant = await basket.reserve("c", 3)
    assert grant is not None
    await basket.checkout(grant)
    assert await vmsdb_app.service(Warehouse).on_hand(1, "c") == 1
    assert await active_held(vmsdb_app, "c") == 0
    # Consuming again changes nothing (the caller's own insert collides and rolls back).
    await vmsdb_app.leases.consume(grant)
    assert await vmsdb_app.service(Warehouse).on_hand(1, "c") == 1
    with pytest.raises(LeaseConsumed):
        await basket.cancel(grant)


async def test_release_and_renew(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "r", 2)
    basket = vmsdb_app.service(Basket)
    grant = await basket.reserve("r", 2)
    assert grant is not None
    await basket.extend(grant, timedelta(hours=2))
    await advance_clock(vmsdb_app, timedelta(minutes=30))  # past the first period, within the renewal
    assert await basket.reserve("r", 1) is None
    await basket.cancel(grant)
    await basket.cancel(grant)  # idempotent
    assert await active_held(vmsdb_app, "r") == 0
    with pytest.raises(LeaseReleased):
        await basket.checkout(grant)
    assert await basket.reserve("r", 2) is not None


async def test_rolled_back_caller_leaves_no_lease(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "rb", 1)
    basket = vmsdb_app.service(Basket)
    with pytest.raises(RuntimeError, match="basket failed"):
        await basket.reserve("rb", 1, fail=True)
    async with vmsdb_app.core.admin() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM vms.leases"))).scalar_one() == 0
    assert await basket.reserve("rb", 1) is not None


async def test_caller_still_cannot_write_the_owners_table(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "t", 1)
    await vmsdb_app.service(Basket).reserve("t", 1)
    with pytest.raises(IsolationError) as caught:
        await vmsdb_app.service(Basket).tamper()
    assert (caught.value.service, caught.value.owner) == ("basket", "warehouse")
    # Nor can it write leases in the owner's name.
    with pytest.raises(Exception, match=r"row-level security|permission denied"):
        async with vmsdb_app.core.transaction("basket") as conn:
            await conn.execute(
                text(
                    "INSERT INTO vms.leases (id, service, function, entity, key, key_text, quantity, "
                    "status, created_at, expires_at) VALUES (gen_random_uuid(), 'warehouse', 'hold', "
                    "'bins', '{}', '{}', -100, 'active', now(), now())"
                )
            )


async def test_unknown_row_and_bad_quantity(vmsdb_app: App) -> None:
    assert await vmsdb_app.service(Basket).reserve("missing", 1) is None
    await vmsdb_app.service(Warehouse).stock(1, "q", 1)
    with pytest.raises(Exception, match="quantity must be positive"):
        await vmsdb_app.service(Basket).reserve("q", 0)


async def test_handle_exposes_only_leases_and_queries(vmsdb_app: App) -> None:
    handle = vmsdb_app.service(Basket).warehouse
    with pytest.raises(AttributeError, match="may call only the @Lease and @Query"):
        handle.stock  # noqa: B018


class SnapshotBasket(Service, name="snapbasket"):
    warehouse: Warehouse

    @Transactional(type="RW", isolation="snapshot")
    async def reserve(self, sku: str) -> LeaseGrant | None:
        grant = await self.warehouse.hold(1, sku, 1, timedelta(minutes=10))
        await asyncio.sleep(0.01)  # widen the window in which concurrent grants overlap
        return grant


async def test_snapshot_callers_racing_for_the_last_units_never_oversell(vmsdb_app_factory) -> None:
    async with vmsdb_app_factory([Warehouse, SnapshotBasket]) as app:
        await app.service(Warehouse).stock(1, "last", 3)
        basket = app.service(SnapshotBasket)
        grants = await asyncio.gather(*(basket.reserve("last") for _ in range(30)))
        assert len([g for g in grants if g is not None]) == 3
        assert await active_held(app, "last") == 3


async def test_a_refused_settle_leaves_the_callers_transaction_usable(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "u", 2)
    basket = vmsdb_app.service(Basket)
    grant = await basket.reserve("u", 1)
    assert grant is not None
    await basket.cancel(grant)

    async def consume_then_carry_on() -> str:
        try:
            await consume_lease(grant)
        except LeaseReleased:
            session().add(Line(lease_id=f"note-{grant.id}", sku="u", qty=0))
            return "refused, transaction still usable"
        return "consumed"

    outcome = await basket.run_in_transaction(consume_then_carry_on)
    assert outcome == "refused, transaction still usable"
    async with vmsdb_app.core.admin() as conn:
        assert (await conn.execute(select(Line).where(Line.sku == "u", Line.qty == 0))).first()


async def test_the_core_grants_lists_and_settles_a_lease_on_its_own(vmsdb_app: App) -> None:
    """The protocol lives in dbcore: grant, decode, list, settle by id alone, refusals as errors."""
    await vmsdb_app.service(Warehouse).stock(1, "core", 5, price=7)
    key, period = {"seller": 1, "sku": "core"}, timedelta(minutes=5)
    async with vmsdb_app.core.transaction("basket") as conn:
        grant = await leases.grant(conn, "warehouse", "hold", key, 2, period, "basket")
        assert await leases.grant(conn, "warehouse", "hold", key, 4, period, "basket") is None  # 3 left
    assert grant is not None
    assert isinstance(grant.id, UUID) and isinstance(grant.expires_at, datetime)
    assert (grant.key, grant.quantity, grant.available) == (key, 2, 3)
    assert grant.row["price"] == 7
    async with vmsdb_app.core.admin() as conn:
        [held] = [a for a in await leases.active(conn) if a.key_text == '{"sku": "core", "seller": 1}']
        assert (held.service, held.entity, held.holder, held.quantity) == ("warehouse", "bins", "basket", 2)
        assert not held.expired
        assert held.expires_at == grant.expires_at
    await advance_clock(vmsdb_app, timedelta(minutes=10))
    async with vmsdb_app.core.admin() as conn:
        assert [a.expired for a in await leases.active(conn) if a.quantity == 2] == [True]
        with pytest.raises(LeaseExpired, match=f"lease {grant.id} expired"):
            await leases.settle(conn, "consume", grant.id)  # the lease function is looked up
        released = await leases.settle(conn, "release", grant.id, service="warehouse", function="hold")
        assert released["status"] == "expired"
        assert await leases.active(conn) == []
        unknown = uuid4()
        with pytest.raises(LeaseNotFound, match=f"lease {unknown} does not exist"):
            await leases.settle(conn, "release", unknown)


# -- many leases in one statement -------------------------------------------------------------


async def grants_of(app: App, sku: str, quantities: list[int]) -> list[LeaseGrant]:
    await app.service(Warehouse).stock(1, sku, sum(quantities) + 10)
    grants = [await app.service(Basket).reserve(sku, q) for q in quantities]
    assert all(g is not None for g in grants)
    return [g for g in grants if g is not None]


async def test_a_batch_consume_and_release_settle_every_lease(vmsdb_app: App) -> None:
    sold = await grants_of(vmsdb_app, "b1", [1, 2, 3])
    kept = await grants_of(vmsdb_app, "b2", [4, 5])
    basket = vmsdb_app.service(Basket)

    async def settle_both() -> str:
        consumed = await consume_leases(sold)
        released = await release_leases([g.id for g in kept], granted_by=Warehouse.hold)
        return ",".join(f"{s.id}:{s.settled}:{s.lease and s.lease['status']}" for s in consumed + released)

    outcome = await basket.run_in_transaction(settle_both)
    expected = [f"{g.id}:True:consumed" for g in sold] + [f"{g.id}:True:released" for g in kept]
    assert outcome.split(",") == expected
    assert await vmsdb_app.service(Warehouse).on_hand(1, "b1") == 10  # 16 - 6 sold
    assert await vmsdb_app.service(Warehouse).on_hand(1, "b2") == 19  # nothing sold
    assert await active_held(vmsdb_app, "b1") == 0 and await active_held(vmsdb_app, "b2") == 0


async def test_a_batch_reports_each_refusal_and_the_transaction_goes_on(vmsdb_app: App) -> None:
    await vmsdb_app.service(Warehouse).stock(1, "old", 10)
    basket = vmsdb_app.service(Basket)
    expired = await basket.reserve("old", 1)
    await advance_clock(vmsdb_app, timedelta(minutes=11))
    live, released, consumed = await grants_of(vmsdb_app, "r2", [1, 2, 3])
    assert expired is not None
    await basket.cancel(released)
    await basket.checkout(consumed)
    unknown = uuid4()

    async def consume_all_then_write() -> str:
        settled = await consume_leases(
            [expired.id, live.id, released.id, consumed.id, unknown], granted_by=basket.warehouse.hold
        )
        session().add(Line(lease_id="after-the-batch", sku="r2", qty=0))  # the transaction is usable
        await session().flush()
        errors = [type(s.error()).__name__ for s in settled]
        with pytest.raises(LeaseExpired, match=f"lease {expired.id} expired"):
            settled[0].raise_if_refused()
        settled[1].raise_if_refused()  # settled: nothing to raise
        return " ".join(f"{s.refusal}/{e}" for s, e in zip(settled, errors, strict=True))

    outcome = await basket.run_in_transaction(consume_all_then_write)
    # Consuming what was consumed is settled again (idempotent), not refused.
    assert outcome.split() == [
        "expired/LeaseExpired",
        "None/NoneType",
        "released/LeaseReleased",
        "None/NoneType",
        "not_found/LeaseNotFound",
    ]
    assert await vmsdb_app.service(Warehouse).on_hand(1, "old") == 10  # the expired one sold nothing
    assert await vmsdb_app.service(Warehouse).on_hand(1, "r2") == 16 - 1 - 3
    async with vmsdb_app.core.admin() as conn:
        assert (await conn.execute(select(Line).where(Line.lease_id == "after-the-batch"))).first()


async def test_a_batch_is_idempotent(vmsdb_app: App) -> None:
    grants = await grants_of(vmsdb_app, "twice", [2, 2])
    basket = vmsdb_app.service(Basket)

    async def consume() -> str:
        settled = await consume_leases([*grants, grants[0].id])  # the same lease twice, too
        return " ".join(str(s.settled) for s in settled)

    assert await basket.run_in_transaction(consume) == "True True True"
    assert await basket.run_in_transaction(consume) == "True True True"
    assert await vmsdb_app.service(Warehouse).on_hand(1, "twice") == 10


async def test_a_batch_of_n_leases_is_one_statement(vmsdb_app: App) -> None:
    grants = await grants_of(vmsdb_app, "n", [1] * 8)
    basket = vmsdb_app.service(Basket)
    sent: dict[str, list[str]] = {}

    async def consume() -> str:
        with statements_sent() as sent["named"]:
            first = await consume_leases([g.id for g in grants[:3]], granted_by=basket.warehouse.hold)
        with statements_sent() as sent["grants"]:
            second = await consume_leases(grants[3:6])
        with statements_sent() as sent["ids"]:
            third = await consume_leases([g.id for g in grants[6:]])
        with statements_sent() as sent["none"]:
            assert await release_leases([]) == []
        return " ".join(str(s.settled) for s in first + second + third)

    assert await basket.run_in_transaction(consume) == " ".join(["True"] * 8)
    assert await vmsdb_app.service(Warehouse).on_hand(1, "n") == 10
    assert [len(sent[k]) for k in ("named", "grants", "ids", "none")] == [1, 1, 2, 0], sent
    assert "lease__hold__settle" not in sent["ids"][0]  # the lookup, for all of them


async def test_granted_by_must_name_a_lease_function(vmsdb_app: App) -> None:
    basket = vmsdb_app.service(Basket)

    async def misnamed() -> str:
        with pytest.raises(TypeError, match="granted_by= takes the @Lease function"):
            await consume_leases([uuid4()], granted_by=Warehouse.stock)
        settled = await consume_leases([uuid4()], granted_by=Warehouse.hold)
        return str(settled[0].refusal)

    assert await basket.run_in_transaction(misnamed) == "not_found"
