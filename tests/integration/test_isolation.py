"""G1: a service's transaction cannot write another service's schema nor read its private tables."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from framework import App, IsolationError, ReadOnlyViolation

from .services import Bank, Shop


@pytest.fixture
def vmsdb_services():
    return [Bank, Shop]


async def test_registration_creates_schemas_roles_and_catalog(vmsdb_app: App) -> None:
    async with vmsdb_app.core.admin() as conn:
        schemas = set(
            (
                await conn.execute(
                    text("SELECT nspname FROM pg_namespace WHERE nspname IN ('bank', 'shop', 'vms')")
                )
            ).scalars()
        )
        owners = dict(
            (
                await conn.execute(
                    text(
                        "SELECT n.nspname, r.rolname FROM pg_namespace n "
                        "JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname IN ('bank', 'shop')"
                    )
                )
            ).all()
        )
        table_owner = (
            await conn.execute(
                text("SELECT tableowner FROM pg_tables WHERE schemaname = 'bank' AND tablename = 'accounts'")
            )
        ).scalar_one()
        services = dict(
            (await conn.execute(text("SELECT name, version FROM vms.services ORDER BY name"))).all()
        )
    assert schemas == {"bank", "shop", "vms"}
    assert owners == {"bank": "vms_bank", "shop": "vms_shop"}
    assert table_owner == "vms_bank"
    assert services == {"bank": 1, "shop": 1}


async def test_write_into_another_service_raises_and_leaves_nothing(vmsdb_app: App) -> None:
    await vmsdb_app.service(Bank).open("a1", 10)
    with pytest.raises(IsolationError) as caught:
        await vmsdb_app.service(Shop).steal("o1")
    err = caught.value
    assert (err.service, err.owner, err.table, err.action) == ("shop", "bank", "bank.accounts", "write")
    assert "'shop'" in str(err) and "'bank'" in str(err)
    # Nothing half-written: neither the shop's own order nor the bank's balance changed.
    assert await vmsdb_app.service(Shop).orders() == []
    assert await vmsdb_app.service(Bank).balance("a1") == 10


async def test_exported_table_is_readable_private_table_is_not(vmsdb_app: App) -> None:
    await vmsdb_app.service(Bank).open("a1", 10)
    assert await vmsdb_app.service(Shop).read_accounts() == [("a1", 10)]
    with pytest.raises(IsolationError) as caught:
        await vmsdb_app.service(Shop).read_audit()
    assert (caught.value.owner, caught.value.table, caught.value.action) == ("bank", "bank.audit", "access")


async def test_isolation_is_enforced_by_postgres_not_python(vmsdb_app: App) -> None:
    """The same statements as the service's role, without the framework in the way."""
    async with vmsdb_app.core.transaction("shop") as conn:
        await conn.execute(text("SELECT count(*) FROM bank.accounts"))  # exported: allowed
    for statement in (
        "SELECT * FROM bank.audit",
        "INSERT INTO bank.accounts VALUES ('x', 1)",
        "DELETE FROM bank.accounts",
        "CREATE TABLE bank.intruder (id int)",
        "DROP TABLE bank.accounts",
        "SELECT * FROM vms.events",
    ):
        with pytest.raises(Exception) as caught:
            async with vmsdb_app.core.transaction("shop") as conn:
                await conn.execute(text(statement))
        assert "permission denied" in str(caught.value) or "must be owner" in str(caught.value), statement


async def test_read_only_transaction_cannot_write(vmsdb_app: App) -> None:
    with pytest.raises(ReadOnlyViolation) as caught:
        await vmsdb_app.service(Bank).try_write("a2")
    assert "read-only" in str(caught.value)
    async with vmsdb_app.core.admin() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM bank.accounts"))).scalar_one() == 0


async def test_registration_is_idempotent_and_versions_changes(
    vmsdb_app_factory, vmsdb_database: str
) -> None:
    async with vmsdb_app_factory([Bank, Shop]) as first:
        pass
    async with vmsdb_app_factory([Bank, Shop]) as again:
        async with again.core.admin() as conn:
            versions = dict((await conn.execute(text("SELECT name, version FROM vms.services"))).all())
        assert versions == {"bank": 1, "shop": 1}
    # A changed descriptor (here: the bank alone, with the shop gone) is a new version of neither;
    # a changed bank descriptor is recorded as version 2.
    changed = first.descriptors[0].model_copy(update={"dependencies": ("shop",)})
    async with App([Bank, Shop], database_url=vmsdb_database) as app:
        await app.core.register([changed])
        async with app.core.admin() as conn:
            rows = (
                await conn.execute(
                    text("SELECT service, version FROM vms.service_versions ORDER BY service, version")
                )
            ).all()
    assert [tuple(r) for r in rows] == [("bank", 1), ("bank", 2), ("shop", 1)]
