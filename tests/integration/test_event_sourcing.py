"""The event-sourcing variant (recovery paper §3.2) on the real core, with examples/wallets.py.

Both storage patterns reference each other: the shop's orders reference the bank's
event-sourced wallets, and the bank's log references the shop's merchants. Each side is restored
from an old backup in turn, and both checkers judge the result: ``integrity.check`` (from the
core's metadata) and ``log_integrity.check_logs`` (from the logs alone).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import text
from typer.testing import CliRunner

from dbcore import integrity
from dbcore.event_logs import log_references
from dbcore.integrity import IntegrityReport
from dbcore.log_integrity import check_logs
from examples.wallets import Bank, Shop
from framework import App
from framework.cli._integrity import mount
from framework.references import answer, backup, crash, install, restore


@pytest.fixture
async def app(vmsdb_app_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    async with vmsdb_app_factory([Bank, Shop], data_dir=tmp_path) as started:
        await install(started)
        yield started


async def both(app: App) -> tuple[IntegrityReport, IntegrityReport]:
    """What each checker says: from the core's metadata, and from the logs alone."""
    async with app.core.admin(isolation="snapshot") as conn:
        return integrity.check(await integrity.load_snapshot(conn)), await check_logs(conn)


async def log(app: App) -> list[tuple[str, str, dict[str, Any]]]:
    async with app.core.admin() as conn:
        rows = await conn.execute(text("SELECT type, uri, payload FROM bank.es_log ORDER BY seq"))
        return [tuple(r) for r in rows.all()]  # type: ignore[misc]


async def snapshot(app: App, wallet_id: str) -> Any:
    """The wallet's snapshot row, as the administrator sees it (a service's read would begin
    the wallet's new epoch, and a merge would then leave it alone)."""
    async with app.core.admin() as conn:
        sql = text("SELECT state FROM bank.wallets WHERE key = :k")
        return (await conn.execute(sql, {"k": wallet_id})).scalar()


def uncovered_uris(report: IntegrityReport) -> list[str]:
    return sorted(v.reference.uri for v in report.uncovered)


def covered_uris(report: IntegrityReport) -> list[str]:
    return sorted(v.reference.uri for v in report.violations if v.covered_by is not None)


async def test_a_wallet_is_the_fold_of_its_log_and_deletion_is_an_event(app: App) -> None:
    bank, shop = app.service(Bank), app.service(Shop)
    await bank.open("w1", "ada")
    assert await bank.deposit("w1", 50) == 50
    await shop.add_merchant("m1", "Corner shop")
    ref = await bank.pay("w1", "m1", 20)
    assert ref.copy == {"id": "m1", "name": "Corner shop"}
    assert await bank.wallet("w1") == {"owner": "ada", "balance": 30, "payments": 1}
    assert await bank.replayed("w1") == await bank.wallet("w1")
    await shop.place_order("o1", "w1")
    for report in await both(app):
        assert report.globally_consistent, report.to_json()
    assert await bank.close("w1")
    assert await bank.wallet("w1") is None
    types = [t for t, _, _ in await log(app)]
    assert types == ["Opened", "Deposited", "Paid", "vms.ref", "vms.deleted"]  # nothing removed
    for report in await both(app):  # the order's reference now points at ⊥: still consistent
        assert report.globally_consistent, report.to_json()


async def test_the_event_sourced_bank_restored_from_an_old_backup(app: App) -> None:
    bank, shop = app.service(Bank), app.service(Shop)
    await bank.open("w1", "ada")
    await bank.deposit("w1", 50)
    await backup(app, "bank")
    await bank.deposit("w1", 25)  # lost with the crash; the shop's order keeps a copy of it
    await shop.place_order("o1", "w1")
    await crash(app, "bank")
    state = await restore(app, "bank", answers=False)
    assert await snapshot(app, "w1") == {"owner": "ada", "balance": 50, "payments": 0}  # not a read
    for report in await both(app):
        assert report.weakly_consistent and not report.globally_consistent, report.to_json()
        assert covered_uris(report) == ["vms://bank/wallets/w1"]
    assert [t for t, _, _ in await log(app)][-1] == "vms.amnesia"
    await answer(app, state.id, "shop")  # the copy comes back, as the version it was
    assert await bank.wallet("w1") == {"owner": "ada", "balance": 75, "payments": 0}
    assert await bank.replayed("w1") == await bank.wallet("w1")
    assert [t for t, _, _ in await log(app)][-1] == "vms.recovered"
    for report in await both(app):
        assert report.globally_consistent, report.to_json()


async def test_the_shop_restored_with_references_from_the_bank_log(app: App) -> None:
    bank, shop = app.service(Bank), app.service(Shop)
    await shop.add_merchant("m1", "Corner shop")
    await bank.open("w1", "ada")
    await bank.deposit("w1", 50)
    await shop.place_order("o1", "w1")
    await backup(app, "shop")
    await shop.add_merchant("m1", "Corner shop & cafe")  # lost; the bank's log keeps a copy
    await bank.pay("w1", "m1", 20)
    await shop.place_order("o2", "w1")  # lost with the shop, and its reference to w1 with it
    await crash(app, "shop")
    state = await restore(app, "shop", answers=False)
    metadata, logs = await both(app)
    assert metadata.weakly_consistent and not metadata.globally_consistent
    assert covered_uris(metadata) == ["vms://shop/merchants/m1"]
    assert logs.globally_consistent, logs.to_json()  # o1's reference to w1 is in the bank's log
    await answer(app, state.id, "bank")
    async with app.core.admin() as conn:
        name = (await conn.execute(text("SELECT name FROM shop.merchants WHERE id = 'm1'"))).scalar()
    assert name == "Corner shop & cafe"
    for report in await both(app):
        assert report.globally_consistent, report.to_json()


async def test_a_released_reference_leaves_the_log_as_a_record_and_the_count(app: App) -> None:
    bank, shop = app.service(Bank), app.service(Shop)
    await shop.add_merchant("m1", "Corner shop")
    await bank.open("w1", "ada")
    await bank.pay("w1", "m1", 5)
    await bank.pay("w1", "m1", 5)
    async with app.core.admin() as conn:
        refs = await log_references(conn, holder="bank")
        assert [r.data["uri"] for r in refs] == ["vms://shop/merchants/m1"] * 2
        d = "SELECT d FROM vms.entities WHERE uri = 'vms://shop/merchants/m1'"
        assert (await conn.execute(text(d))).scalar() == 2
    assert await bank.release(refs[0].seq)
    assert not await bank.release(refs[0].seq)  # given back already
    async with app.core.admin() as conn:
        assert [r.seq for r in await log_references(conn, holder="bank")] == [refs[1].seq]
        assert (await conn.execute(text(d))).scalar() == 1
    assert [t for t, _, _ in await log(app)][-1] == "vms.unref"
    for report in await both(app):
        assert report.globally_consistent, report.to_json()


async def test_only_the_logs_can_tell_a_version_that_never_existed(app: App) -> None:
    """A reference to a t the owner never stamped for the entity, yet no later than its latest:
    the core's metadata (one t per entity) takes it for an older version; the log knows better."""
    bank, shop = app.service(Bank), app.service(Shop)
    await bank.open("w1", "ada")
    await bank.open("w2", "bob")  # w2's version is w1's t + 1
    await bank.deposit("w1", 5)  # w1 now at w2's t + 1: w2's t is no version of w1
    ref = await shop.place_order("o1", "w1")
    async with app.core.admin() as conn:
        forged = {**ref.to_json(), "t": ref.t - 1}
        sql = text("UPDATE shop.orders SET wallet = CAST(:r AS jsonb) WHERE id = 'o1'")
        await conn.execute(sql, {"r": json.dumps(forged)})
    metadata, logs = await both(app)
    assert metadata.globally_consistent
    assert [(v.kind, v.covered_by) for v in logs.violations] == [("lost", None)]
    assert not logs.weakly_consistent


cli_app: App | None = None


def test_vmsdb_integrity_check_reads_the_event_logs(vmsdb_database: str, tmp_path: Path) -> None:
    global cli_app
    cli_app = App([Bank, Shop], database_url=vmsdb_database, create_tables=True, data_dir=tmp_path)
    cli = typer.Typer()
    mount(cli)
    env = {"VMSDB_APP": "tests.integration.test_event_sourcing:cli_app"}

    async def work(after_backup: bool) -> None:
        assert cli_app is not None
        async with cli_app as running:
            await install(running)
            if not after_backup:
                await running.service(Bank).open("w1", "ada")
            else:
                await running.service(Bank).deposit("w1", 10)  # lost
                await running.service(Shop).place_order("o1", "w1")

    asyncio.run(work(False))
    runner = CliRunner()
    assert runner.invoke(cli, ["backup", "bank"], env=env).exit_code == 0
    asyncio.run(work(True))
    assert runner.invoke(cli, ["integrity", "crash", "bank", "--yes"], env=env).exit_code == 0
    crashed = runner.invoke(cli, ["integrity", "check", "--json"], env=env)
    assert crashed.exit_code == 1  # the bank's tables, its log among them, are gone
    restored = runner.invoke(cli, ["restore", "bank"], env=env)  # the shop answers with its copy
    assert restored.exit_code == 0, restored.output
    checked = runner.invoke(cli, ["integrity", "check"], env=env)
    assert checked.exit_code == 0 and "From the event logs alone" in checked.output, checked.output
    document = json.loads(runner.invoke(cli, ["integrity", "check", "--json"], env=env).output)
    assert document["globally_consistent"] and document["from_event_logs"]["globally_consistent"]
