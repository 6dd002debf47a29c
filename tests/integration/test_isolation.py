"""G1: a service's transaction cannot write another service's schema nor read its private tables."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from framework import App, Event, IsolationError, Outbound, ReadOnlyViolation, Service, Transactional, send
from framework._internal.context import current

from .services import Bank, Shop


class Declared(Event, key="k"):
    k: str


class Undeclared(Event, key="k"):
    k: str


class Hostile(Service, name="hostile"):
    """Runs whatever SQL it is given, in its own transaction: the isolation probes."""

    @Transactional(type="RW")
    async def run(self, *statements: str) -> list[Any]:
        conn = current().connection  # type: ignore[union-attr]
        results = [await conn.execute(text(sql)) for sql in statements]
        return [r.scalar() if r.returns_rows else None for r in results]

    @Outbound(Declared)
    @Transactional(type="RW")
    async def emit(self, k: str) -> None:
        send(Declared(k=k))

    @Outbound(Declared)
    @Transactional(type="RW")
    async def forge(self, event_type: str) -> None:
        """Inserts an event of a type it never declared, by hand, under its own role."""
        await current().connection.execute(  # type: ignore[union-attr]
            text(
                "INSERT INTO vms.events (id, type, key, payload, producer) "
                "VALUES (gen_random_uuid(), :t, 'k1', '{\"k\": \"k1\", \"qty\": 1}', 'hostile')"
            ),
            {"t": event_type},
        )


@pytest.fixture
def vmsdb_services():
    return [Bank, Shop, Hostile]


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
    assert services == {"bank": 1, "shop": 1, "hostile": 1}


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


# -- the probes of issue 15, finding 4: each refused by Postgres, nothing left behind --------------


async def test_a_service_runs_logged_in_as_its_own_role_and_nothing_it_reaches_is_superuser(
    vmsdb_app: App,
) -> None:
    [current_user, session_user, superuser] = await vmsdb_app.service(Hostile).run(
        "SELECT current_user", "SELECT session_user", "SELECT current_setting('is_superuser')"
    )
    assert (current_user, session_user, superuser) == ("vms_hostile", "vms_hostile", "off")
    await vmsdb_app.service(Bank).open("a1", 1)  # the handlers' and the housekeeping's pools too
    async with vmsdb_app.core.admin() as conn:
        logins = (
            await conn.execute(
                text(
                    "SELECT DISTINCT a.usename, r.rolsuper FROM pg_stat_activity a "
                    "JOIN pg_roles r ON r.rolname = a.usename "
                    "WHERE a.datname = current_database() AND a.application_name LIKE 'vmsdb:%'"
                )
            )
        ).all()
    assert {name for name, _ in logins} >= {"vms_hostile", "vms_bank", "vms_core"}
    assert not any(superuser for _, superuser in logins), logins


@pytest.mark.parametrize(
    ("statement", "action", "target"),
    [
        ("SET LOCAL ROLE vms_bank", "become", "role vms_bank"),
        ("SET ROLE vms_bank", "become", "role vms_bank"),
        ("SELECT set_config('role', 'vms_bank', true)", "become", "role vms_bank"),
        ("SELECT set_config('role', 'vms_bank', false)", "become", "role vms_bank"),
        ("SET ROLE vms_services", "become", "role vms_services"),
        ("SET ROLE postgres", "become", "role postgres"),
        ("SET SESSION AUTHORIZATION postgres", "run", None),
        ("ALTER ROLE vms_hostile SUPERUSER", "run", None),
        ("ALTER ROLE vms_bank SUPERUSER", "run", None),
        ("COPY (SELECT 1) TO PROGRAM 'touch /tmp/vmsdb-escaped'", "run", None),
    ],
)
async def test_every_role_escape_is_refused_with_isolation_error(
    vmsdb_app: App, statement: str, action: str, target: str | None
) -> None:
    await vmsdb_app.service(Bank).open("a1", 10)
    with pytest.raises(IsolationError) as caught:
        await vmsdb_app.service(Hostile).run(statement, "UPDATE bank.accounts SET balance = 0")
    err = caught.value
    assert err.service == "hostile" and "'hostile'" in str(err)
    assert err.action == action
    if target is not None:
        assert err.table == target
    assert await vmsdb_app.service(Bank).balance("a1") == 10
    await _later_transactions_are_unaffected(vmsdb_app)


async def test_reset_role_gives_nothing(vmsdb_app: App) -> None:
    await vmsdb_app.service(Bank).open("a1", 10)
    assert await vmsdb_app.service(Hostile).run("RESET ROLE", "SELECT current_user") == [None, "vms_hostile"]
    with pytest.raises(IsolationError) as caught:
        await vmsdb_app.service(Hostile).run("RESET ROLE", "UPDATE bank.accounts SET balance = 0")
    assert (caught.value.service, caught.value.owner, caught.value.action) == ("hostile", "bank", "write")
    with pytest.raises(IsolationError):
        await vmsdb_app.service(Hostile).run("RESET ROLE", "SELECT count(*) FROM bank.audit")
    assert await vmsdb_app.service(Bank).balance("a1") == 10
    await _later_transactions_are_unaffected(vmsdb_app)


async def _later_transactions_are_unaffected(app: App) -> None:
    """25 pooled transactions of every kind after the probes run as who they should."""
    for i in range(25):
        assert await app.service(Hostile).run("SELECT current_user") == ["vms_hostile"]
        await app.service(Shop).record(f"o{i}")
        await app.publish(Declared(k=str(i)))  # the housekeeping's pool: may write vms.events
    assert len(await app.service(Shop).orders()) == 25
    async with app.core.housekeeping() as conn:
        assert (await conn.execute(text("SELECT current_user"))).scalar_one() == "vms_core"


# -- @Outbound enforced by the core (finding 3) --------------------------------------------------


async def test_a_service_inserts_only_the_event_types_it_declared(vmsdb_app: App) -> None:
    await vmsdb_app.service(Bank).open("k1", 10)
    await vmsdb_app.service(Hostile).emit("k1")  # declared: allowed
    with pytest.raises(IsolationError) as caught:
        await vmsdb_app.service(Hostile).forge("Deposit")  # the bank acts on Deposit
    err = caught.value
    assert (err.service, err.table, err.action) == ("hostile", "vms.events", "send")
    assert "'hostile'" in str(err) and "@Outbound" in str(err)
    await vmsdb_app.drain()
    async with vmsdb_app.core.admin() as conn:
        types = (await conn.execute(text("SELECT type FROM vms.events WHERE producer = 'hostile'"))).scalars()
        assert list(types) == ["Declared"]
        assert (await conn.execute(text("SELECT count(*) FROM vms.deliveries"))).scalar_one() == 0
    assert await vmsdb_app.service(Bank).balance("k1") == 10  # no Deposit reached the bank


async def test_delivery_ignores_an_undeclared_event_of_a_local_service_whoever_inserted_it(
    vmsdb_app: App,
) -> None:
    """Defence in depth: even an insert that row-level security does not bind (the
    administrator's) in a service's name, of a type the service never declared, reaches no one."""
    await vmsdb_app.service(Bank).open("k1", 10)
    forged = (
        "INSERT INTO vms.events (id, type, key, payload, producer) VALUES "
        "(gen_random_uuid(), 'Deposit', 'k1', '{\"account\": \"k1\", \"amount\": 5}', :producer)"
    )
    async with vmsdb_app.core.admin() as conn:
        await conn.execute(text(forged), {"producer": "hostile"})
        assert (await conn.execute(text("SELECT count(*) FROM vms.deliveries"))).scalar_one() == 0
        await conn.execute(text(forged), {"producer": None})  # from outside any service: delivered
    await vmsdb_app.drain()
    assert await vmsdb_app.service(Bank).balance("k1") == 15
