"""The body of ``alembic/env.py``: one alembic environment for the core and every service.

``vmsdb migrate`` passes the target and an open connection in ``config.attributes``; plain
``alembic`` selects the core, or a service with ``-x app=module:attr -x service=NAME``, and
connects itself. The machinery (targets, lock, roles) is :mod:`framework._internal.migrations`.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from alembic.config import Config
from alembic.script.revision import RevisionMap
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from dbcore.catalog import quote_ident
from dbcore.core import Core
from dbcore.descriptor import ServiceDescriptor
from framework._internal.config import Settings
from framework._internal.errors import FrameworkError
from framework._internal.loading import load_app
from framework._internal.migrations import (
    DONT_MUTATE_ATTR,
    RUN_ATTR,
    TARGET_ATTR,
    MigrationError,
    MigrationTarget,
    Run,
    Schemas,
    core_of,
    core_target,
    heads_in_db,
    locked,
    stamp_unversioned_catalog,
    targets_of,
)
from framework._internal.service import Service

__all__ = ["run_env"]


@dataclass
class _NoApp:
    """Plain ``alembic`` on the core alone: no services, the environment's settings."""

    settings: Settings = field(default_factory=Settings)
    services: list[type[Service]] = field(default_factory=list)

    @property
    def descriptors(self) -> list[ServiceDescriptor]:
        return []

    @property
    def core(self) -> Core:
        raise FrameworkError("no App: alembic connects to the core itself")


def run_env() -> None:
    """The body of ``alembic/env.py``, for ``vmsdb migrate`` and for plain ``alembic`` alike.

    ``vmsdb migrate`` passes the target and an open connection in ``config.attributes``. Plain
    ``alembic`` selects the core, or a service with ``-x app=module:attr -x service=NAME``, and
    connects itself (``-x url=...``, ``sqlalchemy.url``, ``VMSDB_DATABASE_URL``, or embedded).
    """
    from alembic import context

    config = context.config
    target: MigrationTarget | None = config.attributes.get(TARGET_ATTR)
    app = None
    if target is None:
        target, app = _target_from_command_line()
        if config.config_file_name and config.file_config.has_section("loggers"):
            from logging.config import fileConfig

            fileConfig(config.config_file_name, disable_existing_loggers=False)
    if _command_name(config) == "revision" and not getattr(config.cmd_opts, "autogenerate", False):
        return  # an empty revision needs no database; alembic writes its default one
    if context.is_offline_mode():
        context.configure(dialect_name="postgresql", literal_binds=True, **target.configure_options())
        with context.begin_transaction():
            if target.role is None:
                context.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(target.schema)}")
            else:
                context.execute(f"SET LOCAL ROLE {quote_ident(target.role)}")
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection, target)
    else:
        asyncio.run(_run_standalone(target, app))


def _configure_and_run(connection: Connection, target: MigrationTarget) -> None:
    from alembic import context

    options = target.configure_options()
    run: Run | None = context.config.attributes.get(RUN_ATTR)
    if run is not None:
        options["on_version_apply"] = run.record
    if context.config.attributes.get(DONT_MUTATE_ATTR):
        options["dont_mutate"] = True
    context.configure(connection=connection, **options)
    with context.begin_transaction():
        context.run_migrations()


def _target_from_command_line() -> tuple[MigrationTarget, Schemas | None]:
    from alembic import context

    x = context.get_x_argument(as_dictionary=True)
    spec = x.get("app") or os.environ.get("VMSDB_APP")
    app: Schemas | None = load_app(spec) if spec else None
    service = x.get("service")
    if service is None:
        return core_target(), app
    if app is None:
        raise MigrationError(
            f"-x service={service} needs the app that defines it: add -x app=module:attribute",
            target=service,
        )
    target = targets_of(app, [service], core=False)[0]
    if _command_name(context.config) == "revision":
        target.versions.mkdir(parents=True, exist_ok=True)
    # alembic built its ScriptDirectory from alembic.ini (the core's revisions) before running
    # env.py; point it at the service's directory before anything reads a revision.
    script = context.script
    script.version_locations = [str(target.versions)]
    for memo in ("_version_locations", "_singular_version_location"):
        script.__dict__.pop(memo, None)
    script.revision_map = RevisionMap(script._load_revisions)
    return target, app


def _command_name(config: Config) -> str:
    cmd = getattr(config.cmd_opts, "cmd", None)
    return getattr(cmd[0], "__name__", "") if cmd else ""


async def _run_standalone(target: MigrationTarget, app: Schemas | None) -> None:
    """Plain ``alembic``: connect, then run like ``vmsdb migrate`` does (lock, role, grants)."""
    from alembic import context

    config = context.config
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    owner: Schemas = app if app is not None else _NoApp()
    if url:
        owner.settings = owner.settings.model_copy(update={"database_url": url})
    name = _command_name(config)
    run = Run(target, name)
    config.attributes[RUN_ATTR] = run
    async with core_of(owner) as running:
        if name not in ("upgrade", "downgrade", "stamp"):
            config.attributes[DONT_MUTATE_ATTR] = True
            async with running.engine.connect() as conn:
                transaction = await conn.begin()
                try:
                    await conn.run_sync(lambda sync: _configure_and_run(sync, target))
                finally:
                    await transaction.rollback()
            return
        try:
            async with locked(running, target, register_service=name != "downgrade") as conn:
                if target.is_core and name == "upgrade":
                    await stamp_unversioned_catalog(conn)
                run.before = await conn.run_sync(heads_in_db, target)
                await conn.run_sync(lambda sync: _configure_and_run(sync, target))
        except CommandError:
            raise
        except Exception as err:
            raise run.failure(err) from err
