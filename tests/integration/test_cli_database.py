"""The command line against a real database in states that are not bugs (issue 15, finding 10):
one without the core, and unknown ids. Each prints one line that says what is wrong and what to
do, and exits non-zero; never a traceback."""

from __future__ import annotations

import sys

import pytest

from framework import App
from framework.cli import main
from framework.migrations import migrate
from framework.testing import fresh_database

from .migrations_app import services as migrated_services
from .services import Bank, Shop

SERVICES = [Bank, Shop]
APP = "tests.integration.test_cli_database:SERVICES"
MIGRATED = "tests.integration.migrations_app:services"


def _vmsdb(
    argv: list[str], url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    monkeypatch.setenv("VMSDB_DATABASE_URL", url)
    monkeypatch.setattr(sys, "argv", ["vmsdb", *argv])
    code = 0
    try:
        main()
    except SystemExit as exited:
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [
        ["integrity", "check", "--app", APP],
        ["backup", "bank", "--app", APP],
        ["restore", "bank", "--app", APP],
        ["dead-letters", "list", APP],
        ["dead-letters", "replay", APP, "1"],
        ["leases", APP],
        ["migrate", "down", APP, "--all", "-r", "-99"],
    ],
)
async def test_commands_on_a_database_without_the_core_say_so_in_one_line(
    argv: list[str],
    vmsdb_server: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with fresh_database(vmsdb_server) as url:
        code, out, err = await _in_thread(argv, url, monkeypatch, capsys)
    assert "Traceback" not in out + err
    if argv[0] == "migrate":  # nothing to undo on an empty database: said, and done
        assert code == 0 and "at base" in out, out + err
        return
    assert code != 0
    # One error (an App that would not start lists each schema that is behind, one a line).
    assert err.startswith("error: ") and "vmsdb migrate" in err, err
    assert len(err.splitlines()) == 1 or "not at the head of its migrations" in err, err


async def test_replay_and_discard_of_an_unknown_dead_letter_exit_non_zero(
    vmsdb_database: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await migrate(App(migrated_services, database_url=vmsdb_database))
    for command in ("replay", "discard"):
        code, out, err = await _in_thread(
            ["dead-letters", command, MIGRATED, "424242"], vmsdb_database, monkeypatch, capsys
        )
        assert code == 1, out + err
        [line] = err.splitlines()
        assert "424242" in line and "dead-letters list" in line, line


async def _in_thread(
    argv: list[str], url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """The command runs its own event loop (asyncio.run): not inside the test's."""
    import asyncio

    return await asyncio.to_thread(_vmsdb, argv, url, monkeypatch, capsys)
