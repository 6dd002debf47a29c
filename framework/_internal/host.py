"""What the running parts of an App share, and how a process reaches its core.

``Host`` is the narrow interface: the core, the settings, the service plans, the in-memory
metrics and the services known to recover. The App builds one at start and hands it to its
dispatchers, workers, service runtimes, lease executor, Kafka transport and housekeeping; the
command line builds one without an App (restore must run while an App would refuse to start).

``Database`` is the one way to a core: the configured URL, or the embedded server in
``data_dir`` started on demand and stopped on close.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from dbcore.core import Core
from dbcore.descriptor import ServiceDescriptor
from dbcore.embedded import EmbeddedPostgres
from framework._internal.config import Settings, sqlalchemy_url
from framework._internal.descriptors import ServicePlan
from framework._internal.handoff import HandOff
from framework._internal.metrics import Metrics

__all__ = ["Database", "Host", "connected"]


@dataclass(eq=False)
class Host:
    """The shared state of one running App (or of a command working on its core)."""

    core: Core
    settings: Settings
    plans: list[ServicePlan]
    metrics: Metrics = field(default_factory=Metrics)
    #: Services recovering in consistency mode (G10): they serve nothing until it ends.
    recovering: set[str] = field(default_factory=set)
    #: Services with restored entities nobody has read or written since (framework.epochs).
    amnesia: set[str] = field(default_factory=set)
    #: Which of the App's own subscribers take its events over from their producers
    #: (``framework._internal.handoff``); ``None`` until its dispatchers run.
    handoff: HandOff | None = None

    @property
    def descriptors(self) -> list[ServiceDescriptor]:
        return [p.descriptor for p in self.plans]


class Database:
    """The database of ``settings``: its URL, or an embedded server started on :meth:`open`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._embedded: EmbeddedPostgres | None = None
        self._core: Core | None = None

    async def open(self, *, pool_size: int | None) -> Core:
        """Connect (starting the embedded server if no URL is set) and wait until it answers.

        ``pool_size=None``: no pool, a connection per use (short-lived commands).
        """
        url = self.settings.database_url
        if url is None:
            self._embedded = EmbeddedPostgres(self.settings.data_dir)
            url = await asyncio.to_thread(self._embedded.start)
        if pool_size is None:
            self._core = Core(create_async_engine(sqlalchemy_url(url), poolclass=NullPool))
        else:
            self._core = Core.connect(sqlalchemy_url(url), pool_size=pool_size)
        await self._core.wait_ready()
        return self._core

    async def close(self) -> None:
        if self._core is not None:
            await self._core.close()
            self._core = None
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None


@asynccontextmanager
async def connected(settings: Settings, *, pool_size: int | None = None) -> AsyncIterator[Core]:
    """A core on ``settings``' database for the length of the block."""
    database = Database(settings)
    try:
        yield await database.open(pool_size=pool_size)
    finally:
        await database.close()
