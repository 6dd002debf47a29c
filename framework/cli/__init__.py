"""The ``vmsdb`` command line (Typer, with rich for tables and progress).

The framework's own commands live in this package. Other packages add theirs through the
``vmsdb.commands`` entry-point group, the way pytest and Flask find plugins: the eShop sample
adds ``vmsdb eshop``, the benchmarks add ``vmsdb bench``, and a user's package can add its own::

    [project.entry-points."vmsdb.commands"]
    shop = "shop.cli:app"          # a typer.Typer

A plugin is imported only when its command runs (or ``vmsdb --help`` lists it), so
``import framework.cli`` loads no sample and no benchmark.
"""

from __future__ import annotations

import sys

import typer

from framework.cli._commands import mount as mount_commands
from framework.cli._commands import shared_core
from framework.cli._dashboard import mount as mount_dashboard
from framework.cli._errors import REPORTED, report
from framework.cli._integrity import mount as mount_integrity
from framework.cli._integrity import print_report
from framework.cli._migrate import migrate_app
from framework.cli._plugins import PluginGroup

__all__ = ["cli", "main", "print_report", "shared_core"]

cli = typer.Typer(
    cls=PluginGroup, help="vmsdb: virtual microservices on a Postgres core.", no_args_is_help=True
)
cli.add_typer(migrate_app, name="migrate")
mount_commands(cli)
mount_integrity(cli)
mount_dashboard(cli)


def main() -> None:
    """The console script: any error of the framework or the core is one line and exit code 1."""
    try:
        cli()
    except REPORTED as err:
        report(err)
        sys.exit(1)
