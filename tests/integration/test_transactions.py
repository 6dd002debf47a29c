"""@Transactional: retries of serialization failures, joining, rollback, service boundaries."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from framework import App, RetriesExhausted, Service, ServiceCallError, Transactional, session

from .services import Bank, Shop


@pytest.fixture
def vmsdb_services():
    return [Bank, Shop]


async def test_concurrent_serializable_conflicts_are_retried_and_all_commit(app: App) -> None:
    bank = app.service(Bank)
    await bank.open("hot", 0)
    writers = 20
    results = await asyncio.gather(*(bank.add("hot", 1) for _ in range(writers)))
    assert await bank.balance("hot") == writers
    # Every writer saw a distinct balance: the increments were serialized, none lost.
    assert sorted(results) == list(range(1, writers + 1))
    assert app.metrics.value("transaction_retries", service="bank", function="add") > 0


async def test_retry_budget_exhausted_is_a_clear_error(app: App) -> None:
    class Stubborn(Service, name="stubborn"):
        @Transactional(type="RW", isolation="serializable", max_attempts=2)
        async def conflict(self) -> None:
            await session().execute(text("SELECT 1"))
            raise_conflict = text(
                "DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = 'serialization_failure'; END $$"
            )
            await session().execute(raise_conflict)

    async with App([Stubborn], database_url=app.database_url) as other:
        with pytest.raises(RetriesExhausted) as caught:
            await other.service(Stubborn).conflict()
    assert caught.value.attempts == 2
    assert "Stubborn.conflict" in str(caught.value)


async def test_nested_call_joins_the_outer_transaction(app: App) -> None:
    bank = app.service(Bank)
    assert await bank.nested("n1") == 6
    with pytest.raises(RuntimeError, match="boom"):
        await bank.open_then_fail("n2")
    # The inner open() joined the outer transaction, so the outer failure rolled it back.
    async with app.core.admin() as conn:
        ids = (await conn.execute(text("SELECT id FROM bank.accounts ORDER BY id"))).scalars().all()
    assert ids == ["n1"]


async def test_calling_another_service_inside_a_transaction_is_refused(app: App) -> None:
    shop = app.service(Shop)

    class Meddler(Service, name="meddler"):
        @Transactional
        async def meddle(self) -> None:
            await shop.record("x")

    async with App([Meddler], database_url=app.database_url) as other:
        with pytest.raises(ServiceCallError, match="belongs to one service"):
            await other.service(Meddler).meddle()


async def test_concurrent_tasks_do_not_share_sessions(app: App) -> None:
    bank = app.service(Bank)
    await asyncio.gather(*(bank.open(f"acct-{i}", i) for i in range(30)))
    balances = await asyncio.gather(*(bank.balance(f"acct-{i}") for i in range(30)))
    assert balances == list(range(30))
