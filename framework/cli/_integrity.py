"""``vmsdb integrity check``, ``vmsdb backup SERVICE``, ``vmsdb restore SERVICE`` (Typer, rich).

```
vmsdb integrity check [--json]                  Definitions 1 and 3: broken references, each
                                                with both ends, and what needs manual repair
                                                (event-sourced services: also from their logs)
vmsdb integrity crash SERVICE --yes             simulate a disaster (drop the service's schema)
vmsdb backup SERVICE [--dir D]                  back up one service: schema and metadata
vmsdb restore SERVICE [--backup ID] [--mode availability|consistency] [--timeout S] [--json]
                                                restore it into a new epoch, run the recovery
                                                protocol, print the amnesia report
```

The services come from ``--app module:attribute`` (or ``$VMSDB_APP``), the database from the App
(``VMSDB_DATABASE_URL``, else the embedded one). Mount with :func:`mount`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dbcore.backup import BackupInfo
from dbcore.core import CATALOG_INSTALLED
from dbcore.integrity import IntegrityReport
from dbcore.recovery import Mode, RecoveryState
from framework import references
from framework._internal.errors import FrameworkError
from framework._internal.host import Host, connected
from framework._internal.loading import load_app
from framework.cli._errors import NoCore, run_async
from framework.cli._errors import report as report_error

__all__ = ["amnesia_table", "integrity_app", "mount", "violations_table"]

T = TypeVar("T")

integrity_app = typer.Typer(help="Referential integrity across services (G9, G10).", no_args_is_help=True)
console = Console()

AppOpt = Annotated[
    str | None,
    typer.Option(
        "--app", "-a", help="the services, as module:attribute", envvar="VMSDB_APP", show_default=False
    ),
]
ServiceArg = Annotated[str, typer.Argument(help="the service (its name, as in its descriptor)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]


def _run(target: str | None, work: Callable[[references.Host], Awaitable[T]]) -> T:
    if target is None:
        raise typer.BadParameter("which services? pass --app module:attribute or set VMSDB_APP")
    app = load_app(target)

    async def main() -> T:
        # The core without the App: starting an App re-registers its services (re-creating a
        # lost schema, empty) and refuses to start while a service's tables are missing, which
        # is exactly the state a restore starts from.
        async with connected(app.settings, pool_size=2) as core:
            async with core.admin() as conn:
                if not (await conn.execute(CATALOG_INSTALLED)).scalar_one():
                    raise NoCore(
                        "the database has no vmsdb core (schema vms): run `vmsdb migrate up "
                        f"{target}` to install it and the services' schemas first"
                    )
            host = Host(core, app.settings, app.plans)
            await references.install(host)
            return await work(host)

    return run_async(main)


def _interval(lo: int, hi: int | None) -> str:
    return f"]{lo}, {'…' if hi is None else hi}]"


def violations_table(report: IntegrityReport) -> Table:
    """Definition 1: each reference that is not valid, with both of its ends."""
    table = Table(
        "holder",
        "row",
        "references",
        "seen (t, k)",
        "entity (t, k)",
        "problem",
        "amnesia",
        title="references that are not valid (Definition 1)",
    )
    for v in report.violations:
        r, e = v.reference, v.entity
        table.add_row(
            f"{r.holder}.{r.table}.{r.column}",
            escape(r.key),
            escape(r.uri),
            f"({r.t}, {r.k})",
            "—" if e is None else f"({e.t}, {e.k})" + (" ⊥" if e.deleted else ""),
            v.detail,
            "—" if v.covered_by is None else _interval(v.covered_by.lo, v.covered_by.hi),
            style=None if v.covered_by is not None else "red",
        )
    return table


def amnesia_table(report: IntegrityReport) -> Table:
    """Definition 3: per amnesia interval, the service, the entity and the references in it."""
    table = Table(
        "service",
        "entity",
        "interval",
        "epochs",
        "recovered from",
        "references to repair",
        title="amnesia: what needs manual repair (Definition 3)",
    )
    for repair in report.repairs:
        a = repair.amnesia
        table.add_row(
            a.service,
            escape(a.uri or "(entities created after the backup)"),
            _interval(a.lo, a.hi),
            f"{a.from_epoch} → {a.to_epoch}",
            ", ".join(a.recovered_from),
            escape(", ".join(f"{r.holder}.{r.table}[{r.key}]" for r in repair.references) or "—"),
        )
    return table


def print_report(report: IntegrityReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2, default=str))
        return
    for problem in report.local:
        where = escape(f"{problem.service} {problem.uri or ''}")
        console.print(f"[red]local:[/red] {where}: {escape(problem.problem)}")
    if report.violations:
        console.print(violations_table(report))
    if report.repairs:
        console.print(amnesia_table(report))
    if report.globally_consistent:
        console.print("[green]globally consistent[/green] (Definition 1)")
    elif report.weakly_consistent:
        console.print(
            f"[yellow]weakly consistent[/yellow] (Definition 3): {len(report.violations)} reference(s) "
            "fall in amnesia intervals"
        )
    else:
        console.print(
            f"[red]not consistent[/red]: {len(report.uncovered)} broken reference(s) outside any "
            f"amnesia interval, {len(report.local)} local problem(s)"
        )


@integrity_app.command("check")
def check_command(app: AppOpt = None, as_json: JsonOpt = False) -> None:
    """Check Definitions 1 and 3; exit 1 unless weakly consistent. Event-sourced services are
    checked twice: from the core's metadata, and from their logs alone."""

    async def both(host: references.Host) -> tuple[IntegrityReport, IntegrityReport | None]:
        return await references.check(host), await references.check_logs(host)

    report, from_logs = _run(app, both)
    if as_json:
        document = report.to_json()
        if from_logs is not None:
            document["from_event_logs"] = from_logs.to_json()
        print(json.dumps(document, indent=2, default=str))
    else:
        print_report(report, as_json=False)
        if from_logs is not None:
            console.print("[bold]From the event logs alone[/bold] (event-sourced services):")
            print_report(from_logs, as_json=False)
    if not report.weakly_consistent or (from_logs is not None and not from_logs.weakly_consistent):
        raise typer.Exit(1)


@integrity_app.command("crash")
def crash_command(
    service: ServiceArg,
    app: AppOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="really drop the service's schema")] = False,
) -> None:
    """Simulate a disaster: drop SERVICE's schema, metadata and inbox."""
    if not yes:
        console.print(f"[red]this drops schema {service!r} and all its data; pass --yes[/red]")
        raise typer.Exit(2)
    _run(app, lambda running: references.crash(running, service))
    console.print(f"{service}: crashed (schema dropped)")


def backup_command(
    service: ServiceArg,
    app: AppOpt = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="default: <data dir>/backups")] = None,
) -> None:
    """Back up one service: pg_dump of its schema plus its entities' metadata."""
    info: BackupInfo = _run(app, lambda running: references.backup(running, service, directory))
    console.print(
        f"{info.service}: backup {info.id} (epoch {info.epoch}, t_backup {info.t_backup}, "
        f"{info.entities} entities, {info.bytes} bytes) in {info.path}"
    )


def restore_command(
    service: ServiceArg,
    app: AppOpt = None,
    backup_id: Annotated[str | None, typer.Option("--backup", help="default: the latest")] = None,
    mode: Annotated[str, typer.Option(help="availability or consistency")] = "availability",
    timeout: Annotated[float, typer.Option(help="consistency: seconds to wait for answers")] = 10.0,
    replace: Annotated[bool, typer.Option(help="drop the schema first if it exists")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore SERVICE into a new epoch, recover from cached copies, report the amnesia."""
    if mode not in ("availability", "consistency"):
        raise typer.BadParameter("--mode is availability or consistency")
    chosen: Mode = "consistency" if mode == "consistency" else "availability"
    if backup_id is not None:
        try:
            uuid.UUID(backup_id)
        except ValueError:
            report_error(
                FrameworkError(
                    f"--backup {backup_id!r} is not a backup id: it is the UUID `vmsdb backup "
                    f"{service}` printed (leave it out to restore the latest backup)"
                )
            )
            raise typer.Exit(2) from None

    async def work(running: references.Host) -> tuple[RecoveryState, IntegrityReport]:
        state = await references.restore(
            running, service, backup_id=backup_id, mode=chosen, timeout=timeout, replace=replace
        )
        return state, await references.check(running)

    state, report = _run(app, work)
    if as_json:
        print(json.dumps({"recovery": state.__dict__, "report": report.to_json()}, indent=2, default=str))
        return
    waiting = f", still waiting for {', '.join(state.waiting_for)}" if state.waiting_for else ""
    console.print(
        f"{service}: restored into epoch {state.epoch} (t_backup {state.t_backup}, restored at "
        f"{state.t_restore}), recovery {state.status}{waiting}; "
        f"{len(state.merged)} entit{'y' if len(state.merged) == 1 else 'ies'} brought back from cached copies"
    )
    print_report(report, as_json=False)


def mount(cli: typer.Typer) -> None:
    """Add ``integrity``, ``backup`` and ``restore`` to the ``vmsdb`` command line."""
    cli.add_typer(integrity_app, name="integrity")
    cli.command("backup")(backup_command)
    cli.command("restore")(restore_command)
