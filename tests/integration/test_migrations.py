"""Migrations with alembic: the core catalog and each service's schema, each its own history."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

import dbcore.core
from dbcore.core import Core
from framework import App, Service
from framework._internal.migrations import CORE_BASELINE
from framework.cli._migrate import migrate_app
from framework.migrations import (
    MigrationError,
    SchemaNotAtHead,
    check_at_head,
    current,
    downgrade,
    ensure_at_head,
    migrate,
    revision,
    stamp,
)
from framework.testing import fresh_database

from .migrations_app import Basket, Warehouse
from .migrations_app.faulty import Faulty

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.migrations_app:services"
CORE_REVISIONS = [
    "0001_catalog",
    "0002_delivery_ack",
    "0003_references",
    "0004_service_roles",
    "0005_trace_context",
    "0006_reads_begin_epochs",
    "0007_login_roles",
    "0008_ref_batches_notify_types",
    "0009_handoff",
]
HEADS = {
    "core": ("0009_handoff",),
    "warehouse": ("w0002_audit",),
    "basket": ("b0001_lines",),
}
AT_HEAD = {"vms": HEADS["core"], "warehouse": HEADS["warehouse"], "basket": HEADS["basket"]}


async def query(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(sql), params)
            return [tuple(r) for r in result.all()] if result.returns_rows else []
    finally:
        await engine.dispose()


async def versions(url: str) -> dict[str, tuple[str, ...]]:
    """Every alembic version table in the database, by schema."""
    found: dict[str, tuple[str, ...]] = {}
    for (schema,) in await query(
        url, "SELECT schemaname FROM pg_tables WHERE tablename = 'alembic_version' ORDER BY 1"
    ):
        rows = await query(url, f'SELECT version_num FROM "{schema}".alembic_version ORDER BY 1')
        found[schema] = tuple(r[0] for r in rows)
    return found


async def tables(url: str, schema: str) -> dict[str, str]:
    """Table name -> owner, in ``schema``."""
    rows = await query(url, "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = :s", s=schema)
    return dict(rows)  # type: ignore[arg-type]


def run(*args: str, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "VMSDB_DATABASE_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the core ----------------------------------------------------------------------------------

# Everything that makes up the catalog in schema vms, in a form two databases can be compared by.
CATALOG_SNAPSHOT = {
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), col_description(c.oid, a.attnum)
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'vms'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
    """,
    "relations": """
        SELECT relname, relkind, relacl::text, relrowsecurity, relforcerowsecurity,
               pg_get_userbyid(relowner), obj_description(oid, 'pg_class'), reloptions::text
          FROM pg_class WHERE relnamespace = 'vms'::regnamespace
    """,
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'vms'::regnamespace
    """,
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'vms'",
    "functions": """
        SELECT proname, pg_get_functiondef(oid), proacl::text, prosecdef, pg_get_userbyid(proowner)
          FROM pg_proc WHERE pronamespace = 'vms'::regnamespace
    """,
    "triggers": """
        SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'vms'::regnamespace AND NOT t.tgisinternal
    """,
    "policies": """
        SELECT tablename, policyname, permissive, roles::text, cmd, qual, with_check
          FROM pg_policies WHERE schemaname = 'vms'
    """,
    "schema": "SELECT nspacl::text, pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'vms'",
    "clock": "SELECT id, offset_by FROM vms.clock",
    "group role": "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = 'vms_services'",
}


async def catalog_snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    snapshot = {}
    for part, sql in CATALOG_SNAPSHOT.items():
        rows = await query(url, sql)
        # alembic's own version table is the one thing a migrated catalog has in addition.
        snapshot[part] = sorted(
            (r for r in rows if not any("alembic_version" in str(v) for v in r)), key=repr
        )
    return snapshot


async def test_core_revision_builds_what_core_install_builds(vmsdb_server: str) -> None:
    async with fresh_database(vmsdb_server) as installed, fresh_database(vmsdb_server) as migrated:
        core = Core.connect(installed)
        try:
            await core.install()
        finally:
            await core.close()
        [result] = await migrate(App([], database_url=migrated))
        assert result.applied == CORE_REVISIONS
        expected, got = await catalog_snapshot(installed), await catalog_snapshot(migrated)
        for part in CATALOG_SNAPSHOT:
            assert got[part] == expected[part], (
                f"{part} of the migrated catalog differs from Core.install()'s: the catalog changed "
                "without a core revision (alembic/versions/core)"
            )
        assert expected["columns"] and expected["functions"] and expected["policies"]
        assert await versions(migrated) == {"vms": HEADS["core"]}
        # Core.install() stamps what it built as the core's head, so migrating finds it done.
        assert await versions(installed) == {"vms": HEADS["core"]}


async def test_a_catalog_made_by_core_install_is_recognised(vmsdb_database: str) -> None:
    core = Core.connect(vmsdb_database)
    try:
        await core.install()
    finally:
        await core.close()
    app = App([Warehouse, Basket], database_url=vmsdb_database)
    [core_status, *_] = await current(app)
    assert (core_status.current, core_status.problem) == (HEADS["core"], None)
    results = {r.target: r for r in await migrate(app)}
    assert results["core"].applied == [] and results["core"].after == HEADS["core"]
    assert await versions(vmsdb_database) == AT_HEAD
    assert await check_at_head(app) == []
    assert HEADS["core"][0] == dbcore.core.CATALOG_REVISION


async def test_an_unversioned_catalog_counts_as_the_baseline_and_is_upgraded(vmsdb_database: str) -> None:
    """Core.install() before it stamped its catalog left no version table: that is 0001."""
    core = Core.connect(vmsdb_database)
    try:
        await core.install()
        async with core.admin() as conn:
            await conn.execute(text("DROP TABLE vms.alembic_version"))
            await conn.execute(text("DROP FUNCTION vms.ack(text, bigint, uuid)"))
    finally:
        await core.close()
    app = App([Warehouse, Basket], database_url=vmsdb_database)
    [core_status, *_] = await current(app)
    assert core_status.current == (CORE_BASELINE,)
    assert "Core.install()" in core_status.note
    # Migrating stamps it as the baseline (nothing re-created) and applies what came after.
    results = {r.target: r for r in await migrate(app)}
    assert results["core"].applied == CORE_REVISIONS[1:]
    assert await versions(vmsdb_database) == AT_HEAD
    ack = "SELECT to_regprocedure('vms.ack(text, bigint, uuid)') IS NOT NULL"
    assert await query(vmsdb_database, ack) == [(True,)]


# -- services ----------------------------------------------------------------------------------


async def test_a_database_made_by_create_tables_is_adopted_by_stamping(
    vmsdb_database: str, vmsdb_app_factory: Any
) -> None:
    async with vmsdb_app_factory([Warehouse, Basket], create_tables=True):
        pass
    app = App([Warehouse, Basket], database_url=vmsdb_database)
    problems = await check_at_head(app)
    assert [p.split(" is at ")[0] for p in problems] == ["service 'warehouse'", "service 'basket'"]
    assert "vmsdb migrate stamp APP --service warehouse" in problems[0]
    results = await stamp(app, core=True)
    assert {r.target: r.after for r in results} == HEADS
    assert await check_at_head(app) == []
    assert await versions(vmsdb_database) == AT_HEAD
    assert (await tables(vmsdb_database, "warehouse"))["alembic_version"] == "vms_warehouse"


async def test_first_revision_of_a_new_service(
    vmsdb_database: str, tmp_path: Path, vmsdb_app_factory: Any
) -> None:
    class Ledger(Service, name="mig_ledger"):
        __migrations__ = str(tmp_path / "ledger")

    class Entry(Ledger.Model):
        __tablename__ = "entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        amount: Mapped[int]

    class Scratch(Service, name="mig_scratch"):  # no revisions: its tables come from create_tables
        pass

    class Note(Scratch.Model):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)

    async with vmsdb_app_factory([Scratch], create_tables=True):
        pass
    app = App([Ledger, Scratch], database_url=vmsdb_database)
    [problem] = await check_at_head(app)  # the catalog of Core.install() and Scratch's tables pass
    assert "'mig_ledger' has no revisions" in problem and "(entries) do not exist" in problem
    assert "vmsdb migrate revision APP --service mig_ledger" in problem

    # Nothing of the ledger exists yet (not even its schema): the revision creates it all.
    path = await revision(app, "create entries", service="mig_ledger")
    assert path is not None and path.parent == tmp_path / "ledger"
    with pytest.raises(SchemaNotAtHead) as caught:
        await ensure_at_head(app)
    assert "'mig_ledger' is at base (no revision)" in str(caught.value)
    assert "vmsdb migrate APP --service mig_ledger" in str(caught.value)

    results = {r.target: r for r in await migrate(app)}
    assert len(results["mig_ledger"].applied) == 1 and results["mig_scratch"].applied == []
    assert await tables(vmsdb_database, "mig_ledger") == {
        "entries": "vms_mig_ledger",
        "alembic_version": "vms_mig_ledger",
    }
    await ensure_at_head(app)


async def test_upgrade_downgrade_and_upgrade_again(vmsdb_database: str) -> None:
    app = App([Warehouse, Basket], database_url=vmsdb_database)
    problems = await check_at_head(app)
    assert len(problems) == 3
    assert "core catalog" in problems[0] and "vmsdb migrate APP" in problems[0]
    assert "'warehouse'" in problems[1] and "vmsdb migrate APP --service warehouse" in problems[1]

    results = {r.target: r for r in await migrate(app)}
    assert results["core"].applied == CORE_REVISIONS
    assert results["warehouse"].applied == ["w0001_items", "w0002_audit"]
    assert results["basket"].applied == ["b0001_lines"]
    assert await versions(vmsdb_database) == AT_HEAD
    # Each service's tables, version table included, belong to the service's role.
    assert await tables(vmsdb_database, "warehouse") == {
        "items": "vms_warehouse",
        "audit": "vms_warehouse",
        "alembic_version": "vms_warehouse",
    }
    assert await tables(vmsdb_database, "basket") == {"lines": "vms_basket", "alembic_version": "vms_basket"}
    assert await check_at_head(app) == []

    # One service one step down: the other service and the core are untouched.
    [result] = await downgrade(app, "-1", services=["warehouse"])
    assert (result.before, result.after) == (("w0002_audit",), ("w0001_items",))
    assert set(await tables(vmsdb_database, "warehouse")) == {"items", "alembic_version"}
    assert set(await tables(vmsdb_database, "basket")) == {"lines", "alembic_version"}
    [problem] = await check_at_head(app)
    assert "'warehouse' is at w0001_items, head is w0002_audit" in problem
    assert "vmsdb migrate APP --service warehouse" in problem

    # Everything to base, the core last; then up again.
    results = {r.target: r for r in await downgrade(app, "base", core=True)}
    assert [results[t].after for t in ("warehouse", "basket", "core")] == [(), (), ()]
    assert await tables(vmsdb_database, "warehouse") == {"alembic_version": "vms_warehouse"}
    assert await tables(vmsdb_database, "basket") == {"alembic_version": "vms_basket"}
    assert set(await tables(vmsdb_database, "vms")) == {"alembic_version"}
    assert (
        await query(vmsdb_database, "SELECT proname FROM pg_proc WHERE pronamespace = 'vms'::regnamespace")
        == []
    )

    results = {r.target: r for r in await migrate(app)}
    assert {t: r.after for t, r in results.items()} == HEADS
    assert await check_at_head(app) == []


async def test_isolation_holds_on_tables_added_by_migrations(
    vmsdb_database: str, vmsdb_app_factory: Any
) -> None:
    await migrate(App([Warehouse, Basket], database_url=vmsdb_database))
    async with vmsdb_app_factory([Warehouse, Basket], create_tables=False) as app:
        await app.service(Warehouse).stock("i1", 5)
        # items (exported, created by w0001, altered by w0002): readable, through the framework too.
        assert await app.service(Basket).items() == [("i1", 5)]
        async with app.core.transaction("basket") as conn:
            assert (await conn.execute(text("SELECT location FROM warehouse.items"))).scalar_one() == "A1"
        for statement in (
            "INSERT INTO warehouse.items VALUES ('x', 1, 'B2')",
            "UPDATE warehouse.items SET qty = 0",
            "ALTER TABLE warehouse.items ADD COLUMN stolen int",
            "SELECT * FROM warehouse.audit",  # private, added by w0002
            "INSERT INTO warehouse.audit VALUES (1, 'x')",
            "SELECT * FROM warehouse.alembic_version",
            "DELETE FROM warehouse.alembic_version",
            "CREATE TABLE warehouse.intruder (id int)",
        ):
            with pytest.raises(Exception, match=r"permission denied|must be owner"):
                async with app.core.transaction("basket") as conn:
                    await conn.execute(text(statement))
    assert await query(vmsdb_database, "SELECT qty FROM warehouse.items") == [(5,)]


async def test_autogenerate_writes_only_that_services_changes(vmsdb_database: str, tmp_path: Path) -> None:
    await migrate(App([Warehouse, Basket], database_url=vmsdb_database))
    versions_dir = tmp_path / "warehouse"
    shutil.copytree(ROOT / "tests/integration/migrations_app/migrations/warehouse", versions_dir)
    # Differences elsewhere that a careless comparison would pick up.
    for sql in (
        "CREATE TABLE basket.stray (id int)",
        "CREATE TABLE public.stray (id int)",
        "ALTER TABLE basket.lines ADD COLUMN extra int",
    ):
        await query(vmsdb_database, sql)

    class Warehouse2(Service, name="warehouse"):  # the warehouse, one release later
        __migrations__ = str(versions_dir)

    @Warehouse2.export
    class Item(Warehouse2.Model):
        __tablename__ = "items"
        id: Mapped[str] = mapped_column(primary_key=True)
        qty: Mapped[int]
        location: Mapped[str | None]
        price: Mapped[int | None]  # new

    class Audit(Warehouse2.Model):
        __tablename__ = "audit"
        id: Mapped[int] = mapped_column(primary_key=True)
        note: Mapped[str]

    class Shelf(Warehouse2.Model):  # new, private
        __tablename__ = "shelves"
        id: Mapped[str] = mapped_column(primary_key=True)

    app = App([Warehouse2, Basket], database_url=vmsdb_database)
    path = await revision(app, "price and shelves", service="warehouse")
    assert path is not None and path.parent == versions_dir
    source = path.read_text().replace("'", '"')  # quotes as ruff format leaves them, or not
    assert 'down_revision: str | Sequence[str] | None = "w0002_audit"' in source
    assert 'op.add_column("items", sa.Column("price"' in source
    assert 'op.create_table(\n        "shelves"' in source or 'op.create_table("shelves"' in source
    assert source.count('schema="warehouse"') >= 4  # add, create (up) and drop, drop (down)
    for other in ("basket", "public", "stray", "vms", "extra", "clock"):
        assert other not in source, other
    linted = await asyncio.to_thread(run, "-m", "ruff", "check", "--no-cache", str(path), url=vmsdb_database)
    assert linted.returncode == 0, linted.stdout  # generated revisions pass the project's ruff

    [result] = await migrate(app, services=["warehouse"], core=False)
    assert result.before == ("w0002_audit",) and len(result.applied) == 1
    assert await tables(vmsdb_database, "warehouse") == {
        "items": "vms_warehouse",
        "audit": "vms_warehouse",
        "shelves": "vms_warehouse",
        "alembic_version": "vms_warehouse",
    }
    assert await query(vmsdb_database, "SELECT extra FROM basket.lines") == []  # untouched
    assert await revision(app, "nothing", service="warehouse") is None  # no changes, nothing written
    assert len(list(versions_dir.glob("*.py"))) == 3

    # Autogenerating against a schema that is not at head is refused, saying what to run.
    await downgrade(app, "-1", services=["warehouse"])
    with pytest.raises(MigrationError, match=r"vmsdb migrate APP --service warehouse"):
        await revision(app, "too early", service="warehouse")


async def test_a_failing_migration_leaves_nothing_and_names_service_and_revision(vmsdb_database: str) -> None:
    app = App([Warehouse, Faulty], database_url=vmsdb_database)
    with pytest.raises(MigrationError) as caught:
        await migrate(app)
    err = caught.value
    assert (err.target, err.revision) == ("faulty", "f0002_broken")
    assert "service 'faulty'" in str(err) and "f0002_broken" in str(err)
    assert '"weight"' in str(err) and "still at base" in str(err)
    # f0001 ran in the same transaction and went with it: no table, no row, no version.
    assert await tables(vmsdb_database, "faulty") == {}
    # Histories migrated before the failing one stay migrated.
    assert await versions(vmsdb_database) == {"vms": HEADS["core"], "warehouse": HEADS["warehouse"]}

    # From f0001, the failing step leaves f0001's state exactly as it was.
    await migrate(app, services=["faulty"], destination="f0001_things")
    with pytest.raises(MigrationError, match=r"service 'faulty' failed in revision f0002_broken"):
        await migrate(app, services=["faulty"])
    assert await versions(vmsdb_database) == {
        "vms": HEADS["core"],
        "warehouse": HEADS["warehouse"],
        "faulty": ("f0001_things",),
    }
    assert set(await tables(vmsdb_database, "faulty")) == {"things", "alembic_version"}
    columns = await query(
        vmsdb_database,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'faulty' "
        "AND table_name = 'things'",
    )
    assert columns == [("id",)]


async def test_two_processes_migrating_at_once_end_in_one_correct_state(vmsdb_database: str) -> None:
    def up() -> subprocess.CompletedProcess[str]:
        return run("-m", "framework.cli._migrate", APP, url=vmsdb_database, VMSDB_TEST_MIGRATION_DELAY="0.5")

    first, second = await asyncio.gather(asyncio.to_thread(up), asyncio.to_thread(up))
    for done in (first, second):
        assert done.returncode == 0, done.stdout + done.stderr
    assert await versions(vmsdb_database) == AT_HEAD
    # One process applied each history; the other waited for it and found it done.
    output = first.stdout + second.stdout
    assert output.count("service warehouse: base -> w0002_audit (2 revisions)") == 1, output
    assert output.count("service warehouse: at w0002_audit, nothing to do") == 1, output
    core_run = f"core catalog: base -> {HEADS['core'][0]} ({len(CORE_REVISIONS)} revisions)"
    assert output.count(core_run) == 1, output


# -- command lines -----------------------------------------------------------------------------


async def test_plain_alembic_migrates_the_core_and_one_service(vmsdb_database: str) -> None:
    core = run("-m", "alembic", "upgrade", "head", url=vmsdb_database)
    assert core.returncode == 0, core.stderr
    assert await versions(vmsdb_database) == {"vms": HEADS["core"]}

    x = ("-x", f"app={APP}", "-x", "service=basket")
    basket = run("-m", "alembic", *x, "upgrade", "head", url=vmsdb_database)
    assert basket.returncode == 0, basket.stderr
    assert await versions(vmsdb_database) == {"vms": HEADS["core"], "basket": HEADS["basket"]}
    assert await tables(vmsdb_database, "basket") == {"lines": "vms_basket", "alembic_version": "vms_basket"}

    shown = run("-m", "alembic", *x, "current", url=vmsdb_database)
    assert shown.returncode == 0 and "b0001_lines (head)" in shown.stdout, shown.stdout + shown.stderr
    down = run("-m", "alembic", *x, "downgrade", "base", url=vmsdb_database)
    assert down.returncode == 0, down.stderr
    assert await versions(vmsdb_database) == {"vms": HEADS["core"], "basket": ()}


def test_vmsdb_migrate_command(vmsdb_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSDB_DATABASE_URL", vmsdb_database)
    monkeypatch.chdir(ROOT)
    root = typer.Typer()
    root.add_typer(migrate_app, name="migrate")  # as framework/cli.py mounts it
    runner = CliRunner()

    def vmsdb(*args: str) -> Any:
        return runner.invoke(root, ["migrate", *args])

    behind = vmsdb("current", APP, "--check")
    assert behind.exit_code == 1 and "vmsdb migrate APP" in behind.output, behind.output
    done = vmsdb(APP)  # `up` is the default command
    assert done.exit_code == 0, done.output
    assert "service warehouse: base -> w0002_audit (2 revisions)" in done.output
    assert vmsdb("current", APP, "--check").exit_code == 0
    refused = vmsdb("down", APP)
    assert refused.exit_code != 0 and "--service" in refused.output
    stepped = vmsdb("down", APP, "--service", "basket")
    assert stepped.exit_code == 0 and "service basket: b0001_lines -> base" in stepped.output, stepped.output
    unknown = vmsdb("up", APP, "--service", "nope")
    assert unknown.exit_code == 1 and "no service 'nope'" in unknown.output


def test_without_the_core_scripts_migrating_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An installation that lost its vmsdb_alembic package: the error names the fix instead of
    alembic's missing env.py (the wheel test shows that a real wheel has it)."""
    import framework._internal.migrations as internal_migrations

    monkeypatch.setattr(internal_migrations, "ALEMBIC_DIR", tmp_path / "alembic")
    monkeypatch.setattr(internal_migrations, "CORE_VERSIONS", tmp_path / "alembic" / "versions" / "core")
    with pytest.raises(MigrationError, match=r"lacks its package vmsdb_alembic.*pip install -e \."):
        internal_migrations.core_target().config()
