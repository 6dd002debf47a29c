"""``vmsdb migrate``: migrate the core catalog and every service's schema (Typer).

```
vmsdb migrate APP                         core, then every service of APP, to head (= `up`)
vmsdb migrate up APP --service cart       the core, then cart only
vmsdb migrate down APP --service cart     cart one revision down (-r base: all the way)
vmsdb migrate down APP --all -r base      every service, then the core, to base
vmsdb migrate revision APP --service cart -m "add coupons"     autogenerate from cart's models
vmsdb migrate revision --core -m "..."    a core revision (vmsdb's own developers)
vmsdb migrate current APP [--check]       where each history stands (--check: exit 1 if behind)
vmsdb migrate stamp APP --all             record everything as at head, running nothing (for a
                                          database whose tables create_tables made)
```

``APP`` is ``module:attribute`` (an App or a list of services), or ``VMSDB_APP``; without it only
the core catalog is concerned. The database is the App's (``VMSDB_DATABASE_URL``, else embedded).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from framework import migrations
from framework._internal.app import App
from framework._internal.loading import load_app
from framework.cli._errors import run_async
from framework.migrations import MigrationResult

__all__ = ["migrate_app"]


class _DefaultToUp(TyperGroup):
    """``vmsdb migrate APP ...`` means ``vmsdb migrate up APP ...``."""

    # ctx is typed loosely: Typer has shipped both click's and its own vendored Context.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        positional = next((a for a in args if not a.startswith("-")), None)
        if positional is not None and positional not in self.commands:
            args = ["up", *args]
        return super().parse_args(ctx, args)


migrate_app = typer.Typer(
    cls=_DefaultToUp,
    help="Migrate the core catalog and each service's schema (alembic; one history per service).",
    no_args_is_help=True,
)
console = Console()

AppArg = Annotated[
    str | None,
    typer.Argument(
        help="the services, as module:attribute (default: $VMSDB_APP); without it, the core only",
        envvar="VMSDB_APP",
        show_default=False,
    ),
]
ServicesOpt = Annotated[
    list[str] | None,
    typer.Option("--service", "-s", help="only this service (repeatable)", show_default=False),
]


def _load(target: str | None) -> App:
    if target is None:
        return App([])
    app = load_app(target)
    app.workers = False
    return app


def _report(results: list[MigrationResult]) -> None:
    for r in results:
        name = "core catalog" if r.target == "core" else f"service {r.target}"
        before = ", ".join(r.before) or "base"
        after = ", ".join(r.after) or "base"
        if r.applied:
            count = f"{len(r.applied)} revision{'s' if len(r.applied) != 1 else ''}"
            console.print(f"{name}: {before} -> {after} ({count})", highlight=False)
        else:
            console.print(f"{name}: at {after}, nothing to do", highlight=False)
        if r.note:
            console.print(f"[yellow]{name} {r.note}[/yellow]", highlight=False, soft_wrap=True)


@migrate_app.command("up")
def up(
    app: AppArg = None,
    service: ServicesOpt = None,
    core: Annotated[bool, typer.Option("--core/--no-core", help="migrate the core catalog first")] = True,
) -> None:
    """Upgrade the core catalog, then every service (or those named), to head."""
    loaded = _load(app)
    _report(run_async(lambda: migrations.migrate(loaded, services=service or None, core=core)))


migrate_app.command("upgrade", hidden=True)(up)


@migrate_app.command("down")
def down(
    app: AppArg = None,
    service: ServicesOpt = None,
    core: Annotated[bool, typer.Option("--core", help="the core catalog too, after the services")] = False,
    all_: Annotated[bool, typer.Option("--all", help="every service, then the core catalog")] = False,
    revision: Annotated[
        str, typer.Option("--revision", "-r", help="target: -1 (one step), -N, base, or a revision id")
    ] = "-1",
) -> None:
    """Downgrade the named services (and the core with --core, or everything with --all)."""
    if not (service or core or all_):
        raise typer.BadParameter("name what to downgrade: --service NAME (repeatable), --core, or --all")
    loaded = _load(app)
    names = None if all_ else (service or [])
    _report(run_async(lambda: migrations.downgrade(loaded, revision, services=names, core=core or all_)))


migrate_app.command("downgrade", hidden=True)(down)


@migrate_app.command("stamp")
def stamp(
    app: AppArg = None,
    service: ServicesOpt = None,
    core: Annotated[bool, typer.Option("--core", help="the core catalog too")] = False,
    all_: Annotated[bool, typer.Option("--all", help="every service and the core catalog")] = False,
    revision: Annotated[str, typer.Option("--revision", "-r", help="the revision to record")] = "heads",
) -> None:
    """Record histories as at a revision without running it (schemas made by create_tables)."""
    if not (service or core or all_):
        raise typer.BadParameter("name what to stamp: --service NAME (repeatable), --core, or --all")
    loaded = _load(app)
    names = None if all_ else (service or [])
    _report(run_async(lambda: migrations.stamp(loaded, revision, services=names, core=core or all_)))


@migrate_app.command("revision")
def revision(
    app: AppArg = None,
    message: Annotated[str, typer.Option("--message", "-m", help="what the revision does")] = "",
    service: Annotated[
        str | None,
        typer.Option("--service", "-s", help="the service whose history gets it", show_default=False),
    ] = None,
    core: Annotated[bool, typer.Option("--core", help="a revision of the core catalog")] = False,
    autogenerate: Annotated[
        bool,
        typer.Option(
            "--autogenerate/--empty", help="diff the models against the database, or write it empty"
        ),
    ] = True,
    rev_id: Annotated[str | None, typer.Option(help="the revision id (default: random)")] = None,
) -> None:
    """Write a revision; autogenerated from the service's models against its schema only."""
    if (service is None) == (not core) or (service is not None and core):
        raise typer.BadParameter("choose the history: --service NAME or --core")
    if not message:
        raise typer.BadParameter("say what the revision does: -m MESSAGE")
    loaded = _load(app) if service is not None else App([])
    path = run_async(
        lambda: migrations.revision(
            loaded, message, service=service, autogenerate=autogenerate, rev_id=rev_id
        )
    )
    if path is None:
        whose = f"service {service}" if service else "the core"
        console.print(f"no changes: the models of {whose} match the database; nothing written")
    else:
        console.print(f"wrote {path}", highlight=False)


@migrate_app.command("current")
def current(
    app: AppArg = None,
    check: Annotated[bool, typer.Option("--check", help="exit with status 1 unless all is at head")] = False,
) -> None:
    """Show where the core catalog and each service stand against their heads."""
    loaded = _load(app)
    statuses = run_async(lambda: migrations.current(loaded))
    table = Table("history", "current", "head", "status")
    for s in statuses:
        state = "[green]at head[/green]" if s.problem is None else "[yellow]behind[/yellow]"
        table.add_row(
            "core" if s.target == "core" else s.target,
            ", ".join(s.current) or "base",
            ", ".join(s.heads) or "(no revisions)",
            state + (f" ({s.note})" if s.note else ""),
        )
    console.print(table)
    problems = [s.problem for s in statuses if s.problem is not None]
    for problem in problems:
        console.print(f"[yellow]{problem}[/yellow]", highlight=False, soft_wrap=True)
    if check and problems:
        raise typer.Exit(1)


if __name__ == "__main__":
    migrate_app()
