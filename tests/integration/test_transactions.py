"""@Transactional: retries of serialization failures, joining, rollback, service boundaries."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column

from framework import (
    App,
    IsolationError,
    NoTransactionError,
    RetriesExhausted,
    Service,
    ServiceCallError,
    Transactional,
    connection,
    session,
)

from .services import Bank, Shop


@pytest.fixture
def vmsdb_services():
    return [Bank, Shop]


async def test_concurrent_serializable_conflicts_are_retried_and_all_commit(vmsdb_app: App) -> None:
    bank = vmsdb_app.service(Bank)
    await bank.open("hot", 0)
    writers = 20
    results = await asyncio.gather(*(bank.add("hot", 1) for _ in range(writers)))
    assert await bank.balance("hot") == writers
    # Every writer saw a distinct balance: the increments were serialized, none lost.
    assert sorted(results) == list(range(1, writers + 1))
    assert vmsdb_app.metrics.value("transaction_retries", service="bank", function="add") > 0
    # By cause, as Prometheus shows it (vmsdb_transaction_retries_total{cause=...}).
    retries = vmsdb_app.metrics.value("transaction_retries", service="bank", function="add")
    by_cause = sum(
        vmsdb_app.metrics.value("transaction_retries", function="add", cause=c)
        for c in ("serialization failure", "deadlock")
    )
    assert by_cause == retries
    assert (
        b'vmsdb_transaction_retries_total{cause="serialization failure",function="add",service="bank"}'
        in (vmsdb_app.metrics.exposition())
    )


async def test_retry_budget_exhausted_is_a_clear_error(vmsdb_app: App) -> None:
    class Stubborn(Service, name="stubborn"):
        @Transactional(type="RW", isolation="serializable", max_attempts=2)
        async def conflict(self) -> None:
            await session().execute(text("SELECT 1"))
            raise_conflict = text(
                "DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = 'serialization_failure'; END $$"
            )
            await session().execute(raise_conflict)

    async with App([Stubborn], database_url=vmsdb_app.database_url) as other:
        with pytest.raises(RetriesExhausted) as caught:
            await other.service(Stubborn).conflict()
    assert caught.value.attempts == 2
    assert "Stubborn.conflict" in str(caught.value)


async def test_nested_call_joins_the_outer_transaction(vmsdb_app: App) -> None:
    bank = vmsdb_app.service(Bank)
    assert await bank.nested("n1") == 6
    with pytest.raises(RuntimeError, match="boom"):
        await bank.open_then_fail("n2")
    # The inner open() joined the outer transaction, so the outer failure rolled it back.
    async with vmsdb_app.core.admin() as conn:
        ids = (await conn.execute(text("SELECT id FROM bank.accounts ORDER BY id"))).scalars().all()
    assert ids == ["n1"]


async def test_calling_another_service_inside_a_transaction_is_refused(vmsdb_app: App) -> None:
    shop = vmsdb_app.service(Shop)

    class Meddler(Service, name="meddler"):
        @Transactional
        async def meddle(self) -> None:
            await shop.record("x")

    async with App([Meddler], database_url=vmsdb_app.database_url) as other:
        with pytest.raises(ServiceCallError, match="belongs to one service"):
            await other.service(Meddler).meddle()


async def test_concurrent_tasks_do_not_share_sessions(vmsdb_app: App) -> None:
    bank = vmsdb_app.service(Bank)
    await asyncio.gather(*(bank.open(f"acct-{i}", i) for i in range(30)))
    balances = await asyncio.gather(*(bank.balance(f"acct-{i}") for i in range(30)))
    assert balances == list(range(30))


async def test_connection_runs_core_statements_in_the_functions_transaction(vmsdb_app: App) -> None:
    class Teller(Service, name="teller"):
        @Transactional(type="RW")
        async def open_and_count(self, account: str) -> int:
            session().add(TellerNote(id=account, note="opened"))
            await session().flush()  # the session does not flush before connection()'s statements
            await connection().execute(
                text("UPDATE teller.notes SET note = note || ' by core' WHERE id = :id"), {"id": account}
            )
            return (await connection().execute(text("SELECT count(*) FROM teller.notes"))).scalar_one()

        @Transactional(type="RW")
        async def write_then_fail(self, account: str) -> None:
            await connection().execute(
                text("INSERT INTO teller.notes (id, note) VALUES (:id, 'lost')"), {"id": account}
            )
            raise RuntimeError("boom after a core insert")

        @Transactional(type="RW")
        async def write_into_the_bank(self) -> None:
            await connection().execute(text("UPDATE bank.accounts SET balance = 0"))

    class TellerNote(Teller.Model):
        __tablename__ = "notes"
        id: Mapped[str] = mapped_column(primary_key=True)
        note: Mapped[str]

    with pytest.raises(NoTransactionError, match=r"connection\(\)"):
        connection()
    async with App([Teller, Bank], database_url=vmsdb_app.database_url, create_tables=True) as other:
        teller = other.service(Teller)
        assert await teller.open_and_count("t1") == 1
        with pytest.raises(RuntimeError, match="boom"):
            await teller.write_then_fail("t2")
        with pytest.raises(IsolationError, match="bank"):
            await teller.write_into_the_bank()
        async with other.core.admin() as conn:
            rows = (await conn.execute(text("SELECT id, note FROM teller.notes"))).all()
    # Session and Core statements committed together; the failed call left nothing behind.
    assert [tuple(r) for r in rows] == [("t1", "opened by core")]
