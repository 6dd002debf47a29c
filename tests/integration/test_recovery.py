"""G10 on the real core: backup one service, crash it, restore it, recover from cached copies."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import typer
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column
from typer.testing import CliRunner

from dbcore.recovery import RecoveryState
from framework import App, Event, Inbound, Service, Transactional, session
from framework.cli._integrity import mount
from framework.references import (
    Ref,
    ServiceRecovering,
    answer,
    backup,
    check,
    crash,
    delete_reference,
    get_reference,
    install,
    ref_column,
    referenceable,
    restore,
)


class Bonus(Event, key="mid"):
    mid: str
    points: int


class Club(Service, name="club"):
    @Transactional(type="RO")
    async def name_of(self, mid: str) -> str | None:
        row = await session().get(Member, mid)
        return None if row is None else row.name

    @Inbound(Bonus)
    async def on_bonus(self, ev: Bonus) -> None:
        row = await session().get(Member, ev.mid)
        assert row is not None
        row.points += ev.points

    @Transactional
    async def put(self, mid: str, name: str, points: int = 0) -> None:
        row = await session().get(Member, mid)
        if row is None:
            session().add(Member(id=mid, name=name, points=points))
        else:
            row.name, row.points = name, points

    @Transactional
    async def remove(self, mid: str) -> None:
        row = await session().get(Member, mid)
        assert row is not None
        await session().delete(row)


@referenceable
class Member(Club.Model):
    __tablename__ = "members"
    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]
    points: Mapped[int]


class Library(Service, name="library"):  # keeps cached copies: the paper's eager case
    @Transactional
    async def lend(self, lid: str, mid: str) -> Ref:
        ref = await get_reference(Member, mid, copy=True)
        session().add(Loan(id=lid, member=ref))
        return ref

    @Transactional
    async def give_back(self, lid: str) -> None:
        row = await session().get(Loan, lid)
        assert row is not None and row.member is not None
        await delete_reference(row.member)
        await session().delete(row)


class Loan(Library.Model):
    __tablename__ = "loans"
    id: Mapped[str] = mapped_column(primary_key=True)
    member: Mapped[Ref | None] = ref_column(Member)


class Audit(Service, name="audit"):  # references without copies: the lazy case
    @Transactional
    async def note(self, nid: str, mid: str) -> Ref:
        ref = await get_reference(Member, mid)
        session().add(Note(id=nid, member=ref))
        return ref


class Note(Audit.Model):
    __tablename__ = "notes"
    id: Mapped[str] = mapped_column(primary_key=True)
    member: Mapped[Ref | None] = ref_column(Member)


@pytest.fixture
async def app(vmsdb_app_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    async with vmsdb_app_factory([Club, Library, Audit], data_dir=tmp_path) as started:
        await install(started)
        yield started


async def rows(app: App) -> dict[str, tuple[str, int]]:
    async with app.core.admin() as conn:
        result = await conn.execute(text("SELECT id, name, points FROM club.members ORDER BY id"))
        return {i: (n, p) for i, n, p in result.all()}


async def disaster(app: App) -> None:
    """Members m1..m3, a backup, then work the backup never sees: m1 renamed, m4 created."""
    club = app.service(Club)
    for i in (1, 2, 3):
        await club.put(f"m{i}", f"member {i}")
    await backup(app, "club")
    await club.put("m1", "Ada", points=10)  # t=4, lost
    await club.put("m4", "Bob", points=5)  # t=5, created after the backup: lost
    await app.service(Library).lend("l1", "m1")  # copy of m1 at t=4
    await app.service(Library).lend("l4", "m4")  # copy of m4 at t=5
    await app.service(Audit).note("n1", "m1")  # t=4, no copy
    await app.service(Audit).note("n2", "m2")  # t=2, in the backup
    await crash(app, "club")


async def test_a_crash_restored_from_an_old_backup_reports_exactly_the_broken_references(app: App) -> None:
    await disaster(app)
    state = await restore(app, "club", answers=False)
    assert (state.status, state.expected, state.t_backup) == ("recovering", ("audit", "library"), 3)
    report = await check(app)
    broken = {(v.reference.holder, v.reference.key, v.kind) for v in report.violations}
    assert broken == {("library", "l1", "newer"), ("library", "l4", "missing"), ("audit", "n1", "newer")}
    assert report.weakly_consistent and not report.globally_consistent
    assert all(v.covered_by is not None for v in report.violations)
    # One interval per restored entity, open until it is first accessed, and one for entities the
    # backup never knew; each lists the references that need repair.
    repairs = {
        (r.amnesia.uri, r.amnesia.lo, r.amnesia.hi): {x.key for x in r.references} for r in report.repairs
    }
    assert repairs == {
        ("vms://club/members/m1", 3, None): {"l1", "n1"},
        ("vms://club/members/m2", 3, None): set(),
        ("vms://club/members/m3", 3, None): set(),
        (None, 3, 6): {"l4"},
    }
    assert report.to_json()["amnesia"][0]["interval"] == [3, 6]
    assert await rows(app) == {"m1": ("member 1", 0), "m2": ("member 2", 0), "m3": ("member 3", 0)}


async def test_cached_copies_bring_back_newer_values_and_shrink_the_intervals(app: App) -> None:
    await disaster(app)
    state = await restore(app, "club", answers=False)
    assert await answer(app, state.id, "audit") == []  # no copies: nothing to bring back
    assert await answer(app, state.id, "library") == ["vms://club/members/m1", "vms://club/members/m4"]
    assert await rows(app) == {
        "m1": ("Ada", 10),
        "m2": ("member 2", 0),
        "m3": ("member 3", 0),
        "m4": ("Bob", 5),
    }
    report = await check(app)
    assert report.globally_consistent, report.to_json()
    intervals = {r.amnesia.uri: (r.amnesia.lo, r.amnesia.recovered_from) for r in report.repairs}
    assert intervals["vms://club/members/m1"] == (4, ("library",))  # was ]3, ...]
    assert intervals["vms://club/members/m4"] == (5, ("library",))
    async with app.core.admin() as conn:
        status = (await conn.execute(text("SELECT status FROM vms.recoveries"))).scalar_one()
        counts = dict((await conn.execute(text("SELECT uri, d FROM vms.entities"))).all())
    assert status == "completed"
    assert counts["vms://club/members/m1"] == 2 and counts["vms://club/members/m2"] == 1  # exact again


async def test_availability_mode_serves_at_once_and_merges_answers_as_they_arrive(app: App) -> None:
    await disaster(app)
    state = await restore(app, "club", mode="availability", answers=False)
    club = app.service(Club)
    await club.put("m1", "Ada (re-entered by hand)", points=11)  # served during the recovery
    ref = await app.service(Audit).note("n3", "m2")  # a first access: a new epoch begins
    assert ref.k == 2
    await answer(app, state.id, "library")
    got = await rows(app)
    assert got["m1"] == ("Ada (re-entered by hand)", 11)  # the later write wins over the old copy
    assert got["m4"] == ("Bob", 5)  # lost entity brought back from the copy
    await answer(app, state.id, "audit")
    report = await check(app)
    assert {(v.reference.key, v.kind) for v in report.violations} == {("l1", "lost"), ("n1", "lost")}
    assert report.weakly_consistent


async def start_a_recovery_that_waits_for_a_remote_holder(app: App) -> asyncio.Task[RecoveryState]:
    """m1 held by a service of another core that will never answer, then club backed up,
    crashed and restored in consistency mode: the recovery runs until its 1.5 s timeout."""
    await app.service(Club).put("m1", "member 1")
    async with app.core.admin() as conn:
        await conn.execute(
            text("SELECT vms.get_reference('vms://club/members/m1', true, false, NULL, 'remote')")
        )
    await backup(app, "club")
    await crash(app, "club")
    return asyncio.create_task(restore(app, "club", mode="consistency", timeout=1.5))


async def until_the_app_hears(app: App, *, recovering: bool) -> None:
    """Until the App knows (by notification) that club is, or is no longer, recovering."""
    for _ in range(100):
        if ("club" in app.recovering) == recovering:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the App never heard that club is {'' if recovering else 'not '}recovering")


async def test_consistency_mode_refuses_writes_and_references_until_every_holder_answered(app: App) -> None:
    club = app.service(Club)
    recovering = await start_a_recovery_that_waits_for_a_remote_holder(app)
    for _ in range(100):
        async with app.core.admin() as conn:
            mode = (
                await conn.execute(text("SELECT recovering FROM vms.ref_services WHERE service = 'club'"))
            ).scalar()
        if mode == "consistency":
            break
        await asyncio.sleep(0.02)
    # A write refused by the core during the recovery reaches the caller as ServiceRecovering.
    with pytest.raises(ServiceRecovering):
        await club.put("m1", "too early")
    with pytest.raises(ServiceRecovering):
        await app.service(Audit).note("n1", "m1")
    state = await recovering
    assert (state.status, state.waiting_for) == ("timed_out", ("remote",))
    await until_the_app_hears(app, recovering=False)  # the end comes by notification too
    await club.put("m1", "served again")


async def test_consistency_mode_serves_no_reads_and_holds_events_until_it_ends(app: App) -> None:
    club = app.service(Club)
    recovering = await start_a_recovery_that_waits_for_a_remote_holder(app)
    await until_the_app_hears(app, recovering=True)
    with pytest.raises(ServiceRecovering, match="reads included"):
        await club.name_of("m1")
    await app.publish(Bonus(mid="m1", points=3))
    await asyncio.sleep(0.3)
    async with app.core.admin() as conn:
        waiting = (await conn.execute(text("SELECT count(*) FROM vms.deliveries"))).scalar_one()
        letters = (await conn.execute(text("SELECT count(*) FROM vms.dead_letters"))).scalar_one()
    assert (waiting, letters) == (1, 0)  # the event waits for the recovery; it does not fail
    state = await recovering
    assert state.status == "timed_out"
    await until_the_app_hears(app, recovering=False)
    await app.drain()
    assert (await rows(app))["m1"] == ("member 1", 3)
    assert await club.name_of("m1") == "member 1"


async def test_consistency_mode_with_every_holder_here_recovers_before_serving(app: App) -> None:
    await disaster(app)
    state = await restore(app, "club", mode="consistency")
    assert state.status == "completed" and set(state.merged) == {
        "vms://club/members/m1",
        "vms://club/members/m4",
    }
    assert (await rows(app))["m1"] == ("Ada", 10)
    # n1 (no copy of its own) saw m1 at t=4: the library's copy of that version made it valid.
    assert (await check(app)).globally_consistent


async def test_a_restored_holder_recounts_its_references_and_frees_tombstones(app: App) -> None:
    club, library = app.service(Club), app.service(Library)
    await club.put("m1", "member 1")
    await club.put("m2", "member 2")
    await backup(app, "library")  # holds nothing yet
    await library.lend("l1", "m1")
    await club.remove("m1")  # referenced: a tombstone
    await crash(app, "library")
    state = await restore(app, "library")
    assert state.status == "completed"  # nobody references the library
    report = await check(app)
    assert report.globally_consistent, report.to_json()
    async with app.core.admin() as conn:
        left = (await conn.execute(text("SELECT uri FROM vms.entities ORDER BY uri"))).scalars().all()
    assert left == ["vms://club/members/m2"]  # the tombstone went with the lost reference


async def test_a_backup_taken_under_concurrent_writes_loses_nothing_at_or_before_its_time(app: App) -> None:
    club, audit = app.service(Club), app.service(Audit)
    for i in range(8):
        await club.put(f"m{i}", "start")
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await club.put(f"m{(w + n) % 8}", f"w{w}-{n}", points=n)
            await audit.note(f"n{w}-{n}", f"m{(w + n) % 8}")

    writers = [asyncio.create_task(writer(w)) for w in range(4)]
    await asyncio.sleep(0.05)
    info = await backup(app, "club")
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*writers)
    await crash(app, "club")
    await restore(app, "club")
    report = await check(app)
    assert report.weakly_consistent, report.to_json()
    assert report.violations, "the writers ran after the backup: some references must be lost"
    # Every reference to a version stamped at or before t_backup is still valid.
    assert all(v.reference.t > info.t_backup for v in report.violations)


#: The App the command line loads in the next test: --app tests.integration.test_recovery:cli_app
cli_app: App | None = None


def test_the_command_line_backs_up_crashes_restores_and_reports(vmsdb_database: str, tmp_path: Path) -> None:
    global cli_app
    cli_app = App([Club, Library, Audit], database_url=vmsdb_database, create_tables=True, data_dir=tmp_path)
    cli = typer.Typer()
    mount(cli)
    runner = CliRunner()
    env = {"VMSDB_APP": "tests.integration.test_recovery:cli_app"}

    async def work(*steps: str) -> None:
        assert cli_app is not None
        async with cli_app as app:
            await install(app)
            for step in steps:
                if step == "members":
                    for i in (1, 2, 3):
                        await app.service(Club).put(f"m{i}", f"member {i}")
                else:  # after the backup
                    await app.service(Club).put("m1", "Ada", points=10)
                    await app.service(Library).lend("l1", "m1")
                    await app.service(Audit).note("n1", "m1")

    asyncio.run(work("members"))
    done = runner.invoke(cli, ["backup", "club"], env=env)
    assert done.exit_code == 0 and "club: backup" in done.output, done.output
    asyncio.run(work("later"))
    assert runner.invoke(cli, ["integrity", "crash", "club"], env=env).exit_code == 2  # needs --yes
    assert runner.invoke(cli, ["integrity", "crash", "club", "--yes"], env=env).exit_code == 0
    restored = runner.invoke(cli, ["restore", "club", "--mode", "consistency", "--json"], env=env)
    assert restored.exit_code == 0, restored.output
    result = json.loads(restored.output)
    assert result["recovery"]["status"] == "completed"
    assert result["recovery"]["merged"] == ["vms://club/members/m1"]
    assert result["report"]["globally_consistent"]  # the library's copy brought m1 back
    checked = runner.invoke(cli, ["integrity", "check"], env=env)
    assert checked.exit_code == 0 and "globally consistent" in checked.output, checked.output
    assert "amnesia" in checked.output  # the intervals are listed, for the record


class Shelf(Service, name="shelf"):  # keeps partial copies: the member's name only
    @Transactional
    async def tag(self, sid: str, mid: str) -> Ref:
        ref = await get_reference(Member, mid, copy=["name"])
        session().add(Tag(id=sid, member=ref))
        return ref


class Tag(Shelf.Model):
    __tablename__ = "tags"
    id: Mapped[str] = mapped_column(primary_key=True)
    member: Mapped[Ref | None] = ref_column(Member)


async def test_a_partial_copy_cannot_recreate_a_lost_row_and_leaves_it_to_repair(
    vmsdb_app_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    async with vmsdb_app_factory([Club, Shelf], data_dir=tmp_path) as app:
        await install(app)
        club = app.service(Club)
        await club.put("m1", "member 1")
        await backup(app, "club")
        await club.put("m4", "Bob", points=5)  # created after the backup: lost in the crash
        await app.service(Shelf).tag("s4", "m4")  # its copy lacks `points` (NOT NULL, no default)
        await crash(app, "club")
        state = await restore(app, "club", answers=False)
        assert await answer(app, state.id, "shelf") == []  # nothing it could bring back
        assert await rows(app) == {"m1": ("member 1", 0)}
        report = await check(app)
        assert report.weakly_consistent
        assert {(v.reference.key, v.kind) for v in report.violations} == {("s4", "missing")}
        assert all(v.covered_by is not None for v in report.violations)


async def test_a_recovery_end_missed_by_the_listener_is_noticed_soon(app: App) -> None:
    """The App keeps which services recover from notifications; had it missed the end of one
    (its listener's connection lost), re-reading the state must let the service serve again."""
    club = app.service(Club)
    await club.put("m1", "member 1")
    app.recovering.add("club")  # as if the notification of the end never came
    with pytest.raises(ServiceRecovering):
        await club.name_of("m1")
    await until_the_app_hears(app, recovering=False)
    assert await club.name_of("m1") == "member 1"


async def test_an_event_claimed_before_a_recovery_began_is_given_back_untried(app: App) -> None:
    """A worker that comes to an event claimed just before its service began recovering in
    consistency mode gives the claim back: it waits for the recovery, attempts untouched."""
    from dbcore import delivery

    club = app.service(Club)
    await club.put("m1", "member 1")

    async def set_recovering(mode: str | None) -> None:
        async with app.core.admin() as conn:
            await conn.execute(
                text("UPDATE vms.ref_services SET recovering = :m WHERE service = 'club'"), {"m": mode}
            )

    await set_recovering("consistency")
    await until_the_app_hears(app, recovering=True)
    await app.publish(Bonus(mid="m1", points=3))
    async with app.core.autocommit() as conn:
        [item] = await delivery.claim(conn, "club", limit=10, lease_seconds=30, precedence=False)
        await app._dispatchers["club"].handle(item, conn)
        row = (
            await conn.execute(text("SELECT claim, attempts FROM vms.deliveries WHERE subscriber = 'club'"))
        ).one()
    assert (row.claim, row.attempts) == (None, 0)
    await set_recovering(None)
    await app.drain()
    assert (await rows(app))["m1"] == ("member 1", 3)
