"""Schema migrations with alembic: the core catalog and every service's schema, each its own history.

- **The core catalog** (schema ``vms``): revisions in ``alembic/versions/core``, version table
  ``vms.alembic_version``, run as the administrator. ``Core.install()`` creates exactly what the
  head creates and stamps it (``dbcore.core.CATALOG_REVISION``); a catalog that ``Core.install()``
  made before it stamped itself has no version table and is taken to be at ``0001_catalog``
  (:data:`CORE_BASELINE`, stamped so when it is next migrated).
- **A service**: revisions in ``<directory of the module defining the class>/migrations/<service>/``
  (or the directory its class names in ``__migrations__``, relative to that module), version table
  ``<service>.alembic_version``. They run under the service's role (``SET LOCAL ROLE vms_<service>``),
  so what they create is owned by the service and isolated like the rest of its schema; in the same
  transaction exported tables are granted read-only to the other services (``sync_grants``).

Each history migrates in one transaction that first takes the core's install lock (an advisory
lock shared with ``Core.install()``): concurrent starts run one after the other, and the second
finds the work done. A failing revision rolls the whole run of its history back (Postgres DDL is
transactional), and :class:`MigrationError` names the service and the revision.

```python
await migrate(app)                       # core, then every service, to head
problems = await check_at_head(app)      # [] when everything is at head
```
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import sys
import traceback
import warnings
from argparse import Namespace
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import alembic.command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SAWarning
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeDecorator

from dbcore.catalog import CATALOG_SCHEMA, quote_ident
from dbcore.catalog import metadata as catalog_metadata
from dbcore.core import CATALOG_INSTALLED as _CATALOG_INSTALLED
from dbcore.core import (  # importing the core also puts the event log and lease tables on the catalog
    UNSTAMPED_REVISION,
    Core,
    lock_install,
)
from dbcore.descriptor import ServiceDescriptor
from dbcore.isolation import service_connection
from dbcore.registry import register, sync_grants
from framework._internal.config import Settings
from framework._internal.errors import FrameworkError
from framework._internal.host import connected
from framework._internal.service import Service


class Schemas(Protocol):
    """What migrating needs of an App: its services, their descriptors, its settings, and its
    core when it is running (``core`` raises ``FrameworkError`` when it is not)."""

    services: list[type[Service]]
    settings: Settings

    @property
    def descriptors(self) -> list[ServiceDescriptor]: ...

    @property
    def core(self) -> Core: ...

__all__ = [
    "ALEMBIC_DIR",
    "CORE_BASELINE",
    "DONT_MUTATE_ATTR",
    "RUN_ATTR",
    "TARGET_ATTR",
    "MigrationError",
    "MigrationResult",
    "MigrationStatus",
    "MigrationTarget",
    "Run",
    "SchemaNotAtHead",
    "Schemas",
    "check_at_head",
    "core_of",
    "core_target",
    "current",
    "downgrade",
    "ensure_at_head",
    "heads_in_db",
    "locked",
    "migrate",
    "migrations_dir",
    "revision",
    "stamp",
    "stamp_unversioned_catalog",
    "targets_of",
]

log = logging.getLogger("vmsdb.migrations")



def _alembic_dir() -> Path:
    """Where the package ``vmsdb_alembic`` lies: the repository's ``alembic/`` in a checkout
    (``pip install -e .`` maps the name there), ``site-packages/vmsdb_alembic`` from a wheel."""
    spec = importlib.util.find_spec("vmsdb_alembic")
    for location in (spec.submodule_search_locations or ()) if spec is not None else ():
        if Path(location, "env.py").is_file():
            return Path(location)
    return Path(sys.prefix, "vmsdb_alembic")  # missing: MigrationTarget.config() names the fix


#: alembic's script location: ``env.py``, the revision template and the core's revisions.
ALEMBIC_DIR = _alembic_dir()
CORE_VERSIONS = ALEMBIC_DIR / "versions" / "core"
#: The core revision a catalog without a version table is at (one that ``Core.install()`` made
#: before it stamped itself): :data:`dbcore.core.UNSTAMPED_REVISION`. A fresh ``Core.install()``
#: creates and stamps the head, :data:`dbcore.core.CATALOG_REVISION`.
CORE_BASELINE = UNSTAMPED_REVISION
VERSION_TABLE = "alembic_version"
FILE_TEMPLATE = "%(year)d%(month).2d%(day).2d_%(rev)s_%(slug)s"

# Tables in vms made by install SQL rather than declared on the catalog's MetaData.
_CORE_UNMANAGED = frozenset({"clock"})
# Sort imports and format; an empty revision keeps its (unused) `op` import for the author to use.
_RUFF_HOOKS = {
    "ruff_fix": "check --fix --select I --quiet REVISION_SCRIPT_FILENAME",
    "ruff_format": "format --quiet REVISION_SCRIPT_FILENAME",
}
TARGET_ATTR, RUN_ATTR, DONT_MUTATE_ATTR = "vmsdb_target", "vmsdb_run", "vmsdb_dont_mutate"
_VERSIONED = text("SELECT to_regclass(:table) IS NOT NULL")
_SCHEMA_EXISTS = text("SELECT to_regnamespace(:schema) IS NOT NULL")


class MigrationError(FrameworkError, RuntimeError):
    """A history could not be migrated. Nothing of the failed run was applied."""

    def __init__(self, message: str, *, target: str, revision: str | None = None) -> None:
        super().__init__(message)
        self.target = target
        self.revision = revision


class SchemaNotAtHead(MigrationError):
    """The database is behind (or ahead of) the App's revisions; ``problems`` says where."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            "the database is not at the head of its migrations, so the App does not start:\n  - "
            + "\n  - ".join(self.problems)
            + "\n(APP is this App as module:attribute; in development, App(..., migrate=True) "
            "migrates at start-up)",
            target="app",
        )


@dataclass(frozen=True)
class MigrationTarget:
    """One revision history: the core catalog, or one service's schema."""

    name: str
    schema: str
    versions: Path
    metadata: MetaData
    role: str | None = None
    descriptor: ServiceDescriptor | None = None

    @property
    def is_core(self) -> bool:
        return self.descriptor is None

    @property
    def label(self) -> str:
        return f"the core catalog (schema {self.schema})" if self.is_core else f"service {self.name!r}"

    def config(self, connection: Connection | None = None, **attributes: Any) -> Config:
        """An alembic ``Config`` for this history (no ini file needed)."""
        if not (CORE_VERSIONS.is_dir() and (ALEMBIC_DIR / "env.py").is_file()):
            raise MigrationError(
                f"the core's alembic scripts are not at {ALEMBIC_DIR}: this installation of vmsdb "
                "lacks its package vmsdb_alembic; reinstall it (pip install --force-reinstall vmsdb, "
                "or pip install -e . in a checkout)",
                target=self.name,
            )
        cfg = Config(cmd_opts=Namespace(quiet=True))  # the caller reports; alembic stays silent
        cfg.set_main_option("script_location", str(ALEMBIC_DIR).replace("%", "%%"))
        cfg.set_main_option("version_locations", str(self.versions).replace("%", "%%"))
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("file_template", FILE_TEMPLATE.replace("%", "%%"))
        if importlib.util.find_spec("ruff") is not None:
            # Generated revisions come out lint-clean and formatted, by the project's own ruff config.
            cfg.set_section_option("post_write_hooks", "hooks", "ruff_fix, ruff_format")
            for hook, options in _RUFF_HOOKS.items():
                cfg.set_section_option("post_write_hooks", f"{hook}.type", "module")
                cfg.set_section_option("post_write_hooks", f"{hook}.module", "ruff")
                cfg.set_section_option("post_write_hooks", f"{hook}.options", options)
        cfg.attributes[TARGET_ATTR] = self
        if connection is not None:
            cfg.attributes["connection"] = connection
        cfg.attributes.update(attributes)
        return cfg

    def script(self) -> ScriptDirectory:
        return ScriptDirectory.from_config(self.config())

    def configure_options(self) -> dict[str, Any]:
        """``context.configure`` options that confine alembic to this history's schema."""
        schema = self.schema
        unmanaged = _CORE_UNMANAGED if self.is_core else frozenset()

        def include_name(name: str | None, type_: str, parent_names: object) -> bool:
            return name == schema if type_ == "schema" else True

        def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
            if type_ != "table":
                return True
            if getattr(obj, "schema", None) != schema:
                return False
            return not (reflected and compare_to is None and name in unmanaged)

        return {
            "target_metadata": self.metadata,
            "version_table": VERSION_TABLE,
            "version_table_schema": schema,
            "include_schemas": True,
            "include_name": include_name,
            "include_object": include_object,
            "compare_type": True,
            "render_item": render_item,
            # One transaction for the whole run: a failing revision takes back those before it.
            "transaction_per_migration": False,
        }


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Render framework column types as the Postgres types they store.

    A reference column (``ref_column``) is a ``TypeDecorator`` over JSONB: written as itself, a
    generated revision would name a framework class it does not import. Everything else is
    rendered by alembic (``False``).
    """
    if type_ == "type" and isinstance(obj, TypeDecorator) and isinstance(obj.impl_instance, JSONB):
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return "postgresql.JSONB(astext_type=sa.Text())"
    return False


@dataclass
class MigrationResult:
    """What one run did to one history."""

    target: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    applied: list[str] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class MigrationStatus:
    """Where one history stands; ``problem`` is ``None`` when nothing needs doing."""

    target: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    problem: str | None
    note: str = ""


# -- targets ---------------------------------------------------------------------------------


def migrations_dir(cls: type[Service]) -> Path:
    """Where ``cls``'s revisions live: ``__migrations__`` if set, else ``migrations/<service>``
    in the directory of the module that defines the class."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    base = Path(file).resolve().parent if file else Path.cwd()
    configured = getattr(cls, "__migrations__", None)
    if configured is not None:
        path = Path(configured).expanduser()
        return path if path.is_absolute() else base / path
    return base / "migrations" / cls.service_name()


def core_target() -> MigrationTarget:
    return MigrationTarget(
        name="core", schema=CATALOG_SCHEMA, versions=CORE_VERSIONS, metadata=catalog_metadata
    )


def targets_of(
    app: Schemas, services: Iterable[str] | None = None, *, core: bool = True
) -> list[MigrationTarget]:
    """The core (if ``core``) and the named services of ``app`` (all when ``services`` is None)."""
    classes = {cls.service_name(): cls for cls in app.services}
    descriptors = {d.name: d for d in app.descriptors}
    wanted = list(classes) if services is None else list(services)
    for name in wanted:
        if name not in classes:
            known = ", ".join(classes) or "none"
            raise MigrationError(f"no service {name!r} in this app (its services: {known})", target=name)
    found = [core_target()] if core else []
    for name in wanted:
        d = descriptors[name]
        found.append(
            MigrationTarget(
                name=name,
                schema=d.schema_name,
                versions=migrations_dir(classes[name]),
                metadata=classes[name].Model.metadata,
                role=d.role,
                descriptor=d,
            )
        )
    return found


# -- connections -----------------------------------------------------------------------------


@asynccontextmanager
async def core_of(app: Schemas) -> AsyncIterator[Core]:
    """The started App's core, or a short-lived one on the App's database (embedded if no URL)."""
    try:
        started: Core | None = app.core
    except FrameworkError:
        started = None
    if started is not None:
        yield started
        return
    async with connected(app.settings) as core:
        yield core


@asynccontextmanager
async def locked(
    core: Core, target: MigrationTarget, *, register_service: bool
) -> AsyncIterator[AsyncConnection]:
    """One transaction holding the migration lock and running as ``target``'s role.

    The service's registration (role, schema) and its grants happen as the administrator in the
    same transaction, so a new table is never visible to others without its grants.
    """
    async with service_connection(core.engine, None) as conn:
        await lock_install(conn)  # the lock Core.install() takes: see there why
        if target.descriptor is None:
            await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(target.schema)}"))
            yield conn
            return
        if register_service:
            if not (await conn.execute(_CATALOG_INSTALLED)).scalar_one():
                raise MigrationError(
                    f"cannot migrate service {target.name!r}: the core catalog is not installed; "
                    "migrate the core first (`vmsdb migrate APP`, or `alembic upgrade head`)",
                    target=target.name,
                )
            await register(conn, target.descriptor)
        await conn.execute(text(f"SET LOCAL ROLE {quote_ident(target.descriptor.role)}"))
        yield conn
        await conn.execute(text("SET LOCAL ROLE NONE"))
        await sync_grants(conn, target.descriptor)


def heads_in_db(conn: Connection, target: MigrationTarget) -> tuple[str, ...]:
    ctx = MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE, "version_table_schema": target.schema}
    )
    return ctx.get_current_heads()


async def stamp_unversioned_catalog(conn: AsyncConnection) -> bool:
    """A catalog that ``Core.install()`` made has no version table: it is at the baseline."""
    if not (await conn.execute(_CATALOG_INSTALLED)).scalar_one():
        return False
    if (await conn.execute(_VERSIONED, {"table": f"{CATALOG_SCHEMA}.{VERSION_TABLE}"})).scalar_one():
        return False

    def stamp(sync: Connection) -> None:
        ctx = MigrationContext.configure(
            sync, opts={"version_table": VERSION_TABLE, "version_table_schema": CATALOG_SCHEMA}
        )
        ctx.stamp(core_target().script(), CORE_BASELINE)

    await conn.run_sync(stamp)
    log.info("stamped the catalog installed by Core.install() as core revision %s", CORE_BASELINE)
    return True


# -- running a history -----------------------------------------------------------------------


@dataclass
class Run:
    """Book-keeping of one run, to name the failing revision when it fails."""

    target: MigrationTarget
    direction: str
    before: tuple[str, ...] | None = None  # read under the lock, before the first revision
    applied: list[str] = field(default_factory=list)

    def record(self, *, step: MigrationInfo, **_: Any) -> None:
        # For a downgrade step too, the "up" revision is the one the step ran.
        self.applied.append(step.up_revision_id or ",".join(step.up_revision_ids))

    def failed_revision(self, err: BaseException) -> Script | None:
        """The revision whose code was running when ``err`` was raised."""
        try:
            scripts = {Path(s.path).resolve(): s for s in self.target.script().walk_revisions()}
        except CommandError:
            return None
        for frame in reversed(traceback.extract_tb(err.__traceback__)):
            script = scripts.get(Path(frame.filename).resolve())
            if script is not None:
                return script
        return None

    def failure(self, err: BaseException) -> MigrationError:
        if isinstance(err, MigrationError):
            return err
        script = self.failed_revision(err)
        reason = str(err.orig) if isinstance(err, DBAPIError) else str(err)
        reason = reason.strip().splitlines()[0] if reason.strip() else type(err).__name__
        label, where = self.target.label, "before any revision ran"
        if script is not None:
            where = f"in revision {script.revision} ({Path(script.path).name})"
        elif self.applied:
            where = f"after revision {self.applied[-1]}"
        left = "where it was" if self.before is None else f"at {_show(self.before)}"
        return MigrationError(
            f"{self.direction} of {label} failed {where}: {reason}. Nothing of this run was applied: "
            f"{label} is still {left}.",
            target=self.target.name,
            revision=None if script is None else script.revision,
        )


def _show(revisions: Sequence[str]) -> str:
    return ", ".join(revisions) if revisions else "base (no revision)"


async def _run(core: Core, target: MigrationTarget, direction: str, destination: str) -> MigrationResult:
    """Upgrade or downgrade ``target`` to ``destination`` in one locked transaction."""
    run = Run(target, direction)

    def execute(sync: Connection) -> None:
        cfg = target.config(sync, **{RUN_ATTR: run})
        {
            "upgrade": alembic.command.upgrade,
            "downgrade": alembic.command.downgrade,
            "stamp": alembic.command.stamp,
        }[direction](cfg, destination)

    try:
        async with locked(core, target, register_service=direction != "downgrade") as conn:
            if target.is_core and direction == "upgrade":
                await stamp_unversioned_catalog(conn)
            run.before = await conn.run_sync(heads_in_db, target)
            await conn.run_sync(execute)
            after = await conn.run_sync(heads_in_db, target)
    except CommandError as err:
        raise MigrationError(f"{direction} of {target.label}: {err}", target=target.name) from err
    except Exception as err:
        raise run.failure(err) from err
    before = run.before or ()
    if run.applied:
        log.info("%s: %s %s -> %s", target.label, direction, _show(before), _show(after))
    return MigrationResult(target.name, before, after, run.applied)


async def migrate(
    app: Schemas, *, services: Iterable[str] | None = None, core: bool = True, destination: str = "heads"
) -> list[MigrationResult]:
    """Upgrade the core catalog, then each service of ``app`` (all, or those named), to head.

    ``destination`` (services only; the core always goes to head) is an alembic revision.

    Registers each service first (its role and schema must exist for its revisions to run as
    it). A service with no revisions is registered and otherwise left alone. Raises
    :class:`MigrationError` naming the history and revision that failed; histories migrated
    before it stay migrated, the failing one is left where it was.
    """
    results = []
    async with core_of(app) as running:
        for target in targets_of(app, services, core=core):
            if not target.is_core and not target.script().get_heads():
                async with locked(running, target, register_service=True):
                    pass
                note = ""
                if target.metadata.tables:
                    note = (
                        f"has models but no revisions in {target.versions}: write the first with "
                        f"`vmsdb migrate revision APP --service {target.name} -m ...`"
                    )
                    log.warning("service %r %s", target.name, note)
                results.append(MigrationResult(target.name, (), (), note=note))
                continue
            results.append(await _run(running, target, "upgrade", "heads" if target.is_core else destination))
        await running.refresh_owners()
    return results


async def downgrade(
    app: Schemas, destination: str = "-1", *, services: Iterable[str] | None = None, core: bool = False
) -> list[MigrationResult]:
    """Downgrade each service of ``app`` (all, or those named), then the core if ``core``.

    ``destination`` is an alembic revision: ``-1`` (one step), ``base``, or a revision id.
    """
    results = []
    async with core_of(app) as running:
        chosen = targets_of(app, services, core=core)
        for target in [t for t in reversed(chosen) if not t.is_core] + [t for t in chosen if t.is_core]:
            async with running.engine.connect() as conn:
                exists = (await conn.execute(_SCHEMA_EXISTS, {"schema": target.schema})).scalar_one()
            if not exists or not target.script().get_heads():
                results.append(MigrationResult(target.name, (), ()))
                continue
            results.append(await _run(running, target, "downgrade", destination))
        if not core:  # without the catalog there is nothing to refresh
            await running.refresh_owners()
    return results


async def stamp(
    app: Schemas, destination: str = "heads", *, services: Iterable[str] | None = None, core: bool = False
) -> list[MigrationResult]:
    """Record the named services (all when None; the core too if ``core``) as at ``destination``
    without running anything: for schemas made by ``create_tables`` before they had revisions."""
    results = []
    async with core_of(app) as running:
        for target in targets_of(app, services, core=core):
            results.append(await _run(running, target, "stamp", destination))
        await running.refresh_owners()
    return results


async def current(
    app: Schemas, *, services: Iterable[str] | None = None, core: bool = True
) -> list[MigrationStatus]:
    """Where each history stands against its head, with what to run when it is behind."""
    statuses = []
    async with core_of(app) as running, running.engine.connect() as conn:
        for target in targets_of(app, services, core=core):
            statuses.append(await conn.run_sync(_status, target))
    return statuses


async def check_at_head(app: Schemas) -> list[str]:
    """Problems that should stop ``app`` from starting ([] when every history is at head).

    A service without revisions passes when its tables exist (made by ``create_tables``); a
    catalog made by ``Core.install()`` counts as the baseline revision.
    """
    return [s.problem for s in await current(app) if s.problem is not None]


async def ensure_at_head(app: Schemas) -> None:
    """Raise :class:`SchemaNotAtHead`, listing what to run, unless every history is at head."""
    problems = await check_at_head(app)
    if problems:
        raise SchemaNotAtHead(problems)


def _status(conn: Connection, target: MigrationTarget) -> MigrationStatus:
    heads = tuple(target.script().get_heads())
    now, note = heads_in_db(conn, target), ""
    if target.is_core and not now and conn.execute(_CATALOG_INSTALLED).scalar_one():
        now, note = (CORE_BASELINE,), "installed by Core.install(), not stamped yet"
    if set(now) == set(heads):
        if heads or not target.metadata.tables:
            return MigrationStatus(target.name, now, heads, None, note)
        existing = set(inspect(conn).get_table_names(schema=target.schema))
        missing = sorted(t.name for t in target.metadata.tables.values() if t.name not in existing)
        if not missing:
            return MigrationStatus(
                target.name, now, heads, None, "no revisions; tables made by create_tables"
            )
        return MigrationStatus(
            target.name,
            now,
            heads,
            f"{target.label} has no revisions in {target.versions} and its tables "
            f"({', '.join(missing)}) do not exist: write the first with "
            f'`vmsdb migrate revision APP --service {target.name} -m "create tables"`, '
            "then run `vmsdb migrate APP`",
        )
    what = "is not installed" if target.is_core and not now else f"is at {_show(now)}"
    command_line = "vmsdb migrate APP" + ("" if target.is_core else f" --service {target.name}")
    problem = f"{target.label} {what}, head is {_show(heads)}: run `{command_line}`"
    if not now and not target.is_core and target.metadata.tables:
        existing = set(inspect(conn).get_table_names(schema=target.schema))
        if existing & {t.name for t in target.metadata.tables.values()}:
            problem += (
                " (its tables exist without a version, as create_tables makes them: if they match "
                f"the head, record that with `vmsdb migrate stamp APP --service {target.name}`)"
            )
    return MigrationStatus(target.name, now, heads, problem, note)


async def revision(
    app: Schemas,
    message: str,
    *,
    service: str | None = None,
    autogenerate: bool = True,
    rev_id: str | None = None,
) -> Path | None:
    """Write a revision for ``service`` (None: the core) and return its path.

    With ``autogenerate`` the revision holds the differences between the service's models and
    its schema in the database, and nothing of any other schema; it is ``None`` when there are
    none. The history must be at head in the database first.
    """
    target = core_target() if service is None else targets_of(app, [service], core=False)[0]
    target.versions.mkdir(parents=True, exist_ok=True)
    if not autogenerate:
        with contextlib.redirect_stdout(io.StringIO()):  # alembic's hook messages ignore `quiet`
            return _script_path(alembic.command.revision(target.config(), message=message, rev_id=rev_id))

    def generate(sync: Connection) -> Path | None:
        def skip_empty(context: object, revision: object, directives: list[Any]) -> None:
            if directives and directives[0].upgrade_ops.is_empty():
                directives[:] = []

        cfg = target.config(sync, **{DONT_MUTATE_ATTR: True})
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # Reflection does not know the catalog's xid8 columns; the core's revisions name them.
            warnings.filterwarnings("ignore", message="Did not recognize type", category=SAWarning)
            written = alembic.command.revision(
                cfg, message=message, autogenerate=True, rev_id=rev_id, process_revision_directives=skip_empty
            )
        return _script_path(written)

    async with core_of(app) as running, running.engine.connect() as conn:
        transaction = await conn.begin()
        try:
            return await conn.run_sync(generate)
        except CommandError as err:
            now = await conn.run_sync(heads_in_db, target)
            heads = tuple(target.script().get_heads())
            if "not up to date" in str(err):
                raise MigrationError(
                    f"{target.label} is at {_show(now)} in the database but its head is {_show(heads)}: "
                    f"run `vmsdb migrate APP{'' if target.is_core else ' --service ' + target.name}` "
                    "before autogenerating a revision",
                    target=target.name,
                ) from err
            raise MigrationError(f"revision of {target.label}: {err}", target=target.name) from err
        finally:
            await transaction.rollback()  # autogenerate only reads


def _script_path(written: Script | list[Script | None] | None) -> Path | None:
    if isinstance(written, list):
        written = written[0] if written else None
    return None if written is None else Path(written.path)
