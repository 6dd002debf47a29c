"""The core commands of ``vmsdb``: run, services, dead letters, leases, replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dbcore import delivery, replicas
from dbcore.embedded import EmbeddedPostgres
from dbcore.leases import ActiveLease
from dbcore.leases import active as active_leases
from framework._internal.app import App
from framework._internal.config import Settings
from framework._internal.dataflow import coordination_table, flow_table, services_table, write_graph
from framework._internal.descriptors import build_descriptors
from framework._internal.errors import FrameworkError
from framework._internal.loading import load_app
from framework._internal.serving import serving_metrics
from framework.cli._errors import report, run_async

__all__ = ["mount", "shared_core"]

console = Console()
dead_letters_cli = typer.Typer(help="Inspect and replay events that handlers gave up on.")
replicas_cli = typer.Typer(help="Check declared replicas against their sources.")
commands = typer.Typer()


def mount(cli: typer.Typer) -> None:
    """Add these commands to the root ``vmsdb`` group."""
    cli.registered_commands += commands.registered_commands
    cli.add_typer(dead_letters_cli, name="dead-letters")
    cli.add_typer(replicas_cli, name="replicas")


AppArg = Annotated[str, typer.Argument(help="the services, as module:attribute (an App or a list)")]
IdsArg = Annotated[list[int], typer.Argument(help="dead letter ids")]


def _offline(target: str) -> App:
    """The App, to be started for inspection only: no handlers run in a CLI command."""
    app = load_app(target)
    app.workers = False
    return app


@contextlib.contextmanager
def shared_core() -> Iterator[str]:
    """The database URL for several processes sharing one core: ``VMSDB_DATABASE_URL``, or the
    embedded server in ``VMSDB_DATA_DIR``, started here (once, not by each process) and stopped
    when the block ends."""
    settings = Settings()
    if settings.database_url is not None:
        yield settings.database_url
        return
    with EmbeddedPostgres(settings.data_dir) as server:
        yield server.url()


@commands.command()
def run(
    app: AppArg,
    migrate: Annotated[bool, typer.Option(help="migrate the schemas to head before starting")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="serve Prometheus metrics on this port (/metrics, 127.0.0.1; worker i: port + i)"),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="processes sharing the core (deliveries shard through SKIP LOCKED)")
    ] = 1,
) -> None:
    """Run the App's event handlers (and Kafka transport, if configured) until interrupted.

    ``--workers N`` (or several commands) share the work: deliveries are claimed, never handled
    twice.
    """
    import signal

    if workers < 1:
        raise typer.BadParameter("at least 1", param_hint="--workers")
    if workers > 1:
        _run_workers(app, migrate, metrics_port, workers)
        return

    async def serve() -> None:
        target = load_app(app)
        target.migrate = migrate
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with target, serving_metrics(target, metrics_port):
            names = ", ".join(d.name for d in target.descriptors)
            console.print(f"vmsdb: running {names}; Ctrl-C to stop")
            await stop.wait()

    run_async(serve)


def _run_workers(app: str, migrate: bool, metrics_port: int | None, workers: int) -> None:
    """``run --workers N``: N ``vmsdb run`` processes on one core, stopped together."""
    import signal
    import subprocess
    import sys

    with shared_core() as url:
        # Each process sizes its pools to its share of the server's connections.
        env = {**os.environ, "VMSDB_DATABASE_URL": url, "VMSDB_PROCESSES": str(workers)}
        if migrate:  # once, before the workers start (not N migrations racing)

            async def migrate_once() -> None:
                target = load_app(app)
                target.migrate, target.workers = True, False
                async with target:
                    pass

            os.environ["VMSDB_DATABASE_URL"] = url
            run_async(migrate_once)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", "from framework.cli import main; main()", "run", app]
                + ([] if metrics_port is None else ["--metrics-port", str(metrics_port + i)]),
                env=env,
            )
            for i in range(workers)
        ]
        console.print(f"vmsdb: {workers} worker processes ({', '.join(str(p.pid) for p in procs)})")
        stopping: list[int] = []
        # SIGTERM too, not only Ctrl-C: the workers must stop, and the embedded server with them.
        signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
        try:
            while not stopping and all(p.poll() is None for p in procs):
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait()
    failed = [p.returncode for p in procs if p.returncode not in (0, -signal.SIGTERM)]
    if failed:
        raise typer.Exit(1)


@commands.command()
def services(
    app: AppArg,
    graph: Annotated[
        Path, typer.Option(help="write the event dataflow here (.dot, and .svg if Graphviz is installed)")
    ] = Path("dataflow"),
    as_json: Annotated[bool, typer.Option("--json", help="print the descriptors as JSON")] = False,
) -> None:
    """Show the services' descriptors and the event dataflow between them."""
    descriptors = build_descriptors(load_app(app).services)
    if as_json:
        print(json.dumps([d.to_json() for d in descriptors], indent=2))
        return
    console.print(services_table(descriptors))
    console.print(flow_table(descriptors))
    warnings = coordination_table(descriptors)
    if warnings is not None:
        console.print(warnings)
    written = write_graph(descriptors, graph)
    console.print("dataflow graph: " + ", ".join(str(p) for p in written))


@dead_letters_cli.command("list")
def dead_letters_list(
    app: AppArg,
    service: Annotated[str | None, typer.Option(help="only this subscriber")] = None,
    all_: Annotated[bool, typer.Option("--all", help="include replayed ones")] = False,
) -> None:
    """List dead letters: which event, which subscriber, after how many attempts, and why."""

    async def fetch() -> list[delivery.DeadLetter]:
        async with _offline(app) as running, running.core.admin() as conn:
            return await delivery.list_dead_letters(conn, subscriber=service, include_replayed=all_)

    rows = run_async(fetch)
    table = Table("id", "subscriber", "event", "key", "attempts", "error", "failed at", "replayed")
    for r in rows:
        table.add_row(
            str(r.id),
            r.subscriber,
            r.event_type,
            r.key or "",
            str(r.attempts),
            (r.error or "")[:120],
            f"{r.failed_at:%Y-%m-%d %H:%M:%S}",
            "" if r.replayed_at is None else f"{r.replayed_at:%H:%M:%S}",
        )
    console.print(table)
    console.print(f"{len(rows)} dead letter(s)")


@dead_letters_cli.command("replay")
def dead_letters_replay(app: AppArg, ids: IdsArg) -> None:
    """Deliver dead-lettered events again (once each), after fixing what made them fail."""

    async def replay() -> list[tuple[int, bool]]:
        async with _offline(app) as running, running.core.admin() as conn:
            return [(i, await delivery.replay(conn, i)) for i in ids]

    unknown = []
    for dead_letter_id, done in run_async(replay):
        if done:
            console.print(f"dead letter {dead_letter_id}: delivered again")
        else:
            unknown.append(dead_letter_id)
    _refuse_unknown(unknown, "replayed")


@dead_letters_cli.command("discard")
def dead_letters_discard(app: AppArg, ids: IdsArg) -> None:
    """Give up on blocking dead letters for good, so their keys flow on without them."""

    async def discard() -> list[tuple[int, bool]]:
        async with _offline(app) as running, running.core.admin() as conn:
            return [(i, await delivery.discard(conn, i)) for i in ids]

    unknown = []
    for dead_letter_id, done in run_async(discard):
        if done:
            console.print(f"dead letter {dead_letter_id}: discarded")
        else:
            unknown.append(dead_letter_id)
    _refuse_unknown(unknown, "settled")


def _refuse_unknown(ids: list[int], settled: str) -> None:
    """Unknown ids are an error (exit 1), after the others were done."""
    if ids:
        listed = ", ".join(str(i) for i in ids)
        report(
            FrameworkError(
                f"no dead letter {listed} waiting (unknown, or already {settled}): "
                "`vmsdb dead-letters list APP --all` shows them all"
            )
        )
        raise typer.Exit(1)


@commands.command()
def leases(app: AppArg) -> None:
    """List active leases per service and entity."""

    async def fetch() -> list[ActiveLease]:
        async with _offline(app) as running, running.core.admin() as conn:
            return await active_leases(conn)

    rows = run_async(fetch)
    table = Table("service", "entity", "key", "quantity", "holder", "expires at")
    for r in rows:
        expiry = f"{r.expires_at:%Y-%m-%d %H:%M:%S}" + (" (expired)" if r.expired else "")
        table.add_row(r.service, r.entity, r.key_text, str(r.quantity), r.holder or "", expiry)
    console.print(table)
    console.print(f"{len(rows)} active lease(s)")


@replicas_cli.command("check")
def replicas_check(app: AppArg) -> None:
    """Compare every replica with its source (one snapshot) and report differences."""

    async def compare() -> list[replicas.ReplicaDiff]:
        async with _offline(app) as running, running.core.admin(isolation="snapshot") as conn:
            return await replicas.check(conn)

    diffs = run_async(compare)
    table = Table("holder", "replica", "source", "mode", "missing", "extra", "different", "pending")
    for d in diffs:
        style = "" if d.ok else "red"
        table.add_row(
            d.holder,
            d.table,
            d.source,
            d.consistency,
            str(d.missing),
            str(d.extra),
            str(d.different),
            str(d.pending),
            style=style,
        )
    console.print(table)
    bad = [d for d in diffs if not d.ok]
    if bad:
        console.print(f"[red]{len(bad)} replica(s) differ from their source[/red]")
        raise typer.Exit(1)
    console.print(f"{len(diffs)} replica(s) equal to their source")
