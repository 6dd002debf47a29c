"""Configuration from the environment (``VMSDB_*``), with pydantic-settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "sqlalchemy_url"]


class Settings(BaseSettings):
    """``VMSDB_DATABASE_URL`` absent: an embedded Postgres in ``VMSDB_DATA_DIR``."""

    model_config = SettingsConfigDict(env_prefix="VMSDB_", extra="ignore")

    database_url: str | None = None
    data_dir: Path = Path(".vmsdb")
    kafka_bootstrap: str | None = None
    #: Publish this core's committed events to Kafka (when ``kafka_bootstrap`` is set).
    kafka_relay: bool = True
    #: Services of this App whose @Inbound events come from Kafka (produced by another core).
    kafka_remote: list[str] = Field(default_factory=list)
    #: Topic of an event type: ``<prefix><EventType>``, unless ``kafka_topics`` maps it.
    kafka_topic_prefix: str = ""
    kafka_topics: dict[str, str] = Field(default_factory=dict)
    #: Topics of outside producers, mapped to the Event type (or type name) they carry.
    kafka_ingress: dict[str, Any] = Field(default_factory=dict)
    #: The idempotent producer, where the broker supports it (the test broker does not).
    kafka_idempotence: bool = False
    kafka_relay_name: str = "kafka"
    kafka_batch_size: int = Field(default=500, ge=1)
    #: A relay that cannot publish for this long is reported once (and its recovery once).
    kafka_stall_warning: float = Field(default=5.0, gt=0)
    kafka_group_id: str | None = None
    kafka_session_timeout_ms: int = Field(default=10_000, ge=100)
    #: Connections the housekeeping login keeps (claims, outcomes, publish), plus 10.
    pool_size: int = Field(default=10, ge=1)
    #: Processes of this App sharing one database (``vmsdb run --workers N`` sets it): each
    #: sizes its pools to a 1/N share of the server's ``max_connections``.
    processes: int = Field(default=1, ge=1)
    #: Handlers this process runs at once, over all its services (different partition keys).
    worker_concurrency: int = Field(default=16, ge=1)
    #: A claimed delivery not acknowledged within this time is given to another worker.
    claim_timeout: float = Field(default=30.0, gt=0)
    #: Fallback poll interval when no notification arrives.
    poll_interval: float = Field(default=0.5, gt=0)
    #: A service's session idle inside an open transaction for this long is ended by Postgres
    #: (``idle_in_transaction_session_timeout`` on the service's role; 0: never).
    idle_transaction_timeout: float = Field(default=60.0, ge=0)
    #: Deliveries waiting behind a snapshot horizon that has not moved for this long: the
    #: dispatcher logs a warning naming the oldest open transaction's backend.
    horizon_warning: float = Field(default=10.0, gt=0)
    #: Handled events older than this are pruned from the log.
    retention_seconds: float = Field(default=7 * 24 * 3600, gt=0)


def sqlalchemy_url(url: str) -> str:
    """Accept ``postgres://`` and ``postgresql://`` URLs; the core talks asyncpg."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url
