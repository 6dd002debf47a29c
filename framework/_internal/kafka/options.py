"""What the Kafka transport is told: settings, topic names, message headers.

Settings come from :class:`~framework._internal.config.Settings` (``VMSDB_KAFKA_*``) or from keyword options
of ``App(...)``, which end up on the same settings object. Options that ``Settings`` does not
declare (yet) are read with their defaults, so ``App([...], kafka_ingress={...})`` works either way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from framework._internal.config import Settings
from framework._internal.errors import FrameworkError
from framework._internal.events import Event

__all__ = [
    "HEADER_CAUSATION",
    "HEADER_CORRELATION",
    "HEADER_EVENT_ID",
    "HEADER_EVENT_TYPE",
    "HEADER_POSITION",
    "HEADER_PRODUCER",
    "HEADER_TRACEPARENT",
    "HEADER_XID",
    "KafkaOptions",
    "KafkaSetupError",
    "sanitize_topic",
]

# Headers of every message the relay publishes. A message without HEADER_EVENT_ID is foreign.
HEADER_EVENT_ID = "vmsdb-event-id"
HEADER_EVENT_TYPE = "vmsdb-event-type"
HEADER_CORRELATION = "vmsdb-correlation-id"
HEADER_CAUSATION = "vmsdb-causation-id"
HEADER_PRODUCER = "vmsdb-producer"
# The event's place in its producing core's log, (xid, position): for tracing and diagnosis.
HEADER_XID = "vmsdb-xid"
HEADER_POSITION = "vmsdb-position"
# The sender's W3C trace context (when traced), under the header name W3C gives it.
HEADER_TRACEPARENT = "traceparent"

_ILLEGAL = re.compile(r"[^A-Za-z0-9._-]")
_MAX_TOPIC = 249


class KafkaSetupError(FrameworkError, ValueError):
    """The Kafka options do not fit the App (an unknown service, an unknown event type, ...)."""


def sanitize_topic(name: str) -> str:
    """``name`` in Kafka's topic alphabet (``[A-Za-z0-9._-]``, at most 249 characters)."""
    cleaned = _ILLEGAL.sub("_", name)[:_MAX_TOPIC]
    if cleaned in ("", ".", ".."):
        raise KafkaSetupError(f"{name!r} cannot be made into a Kafka topic name")
    return cleaned


@dataclass(frozen=True)
class KafkaOptions:
    """The transport's settings, resolved once at start-up."""

    bootstrap: str
    relay: bool = True
    remote: tuple[str, ...] = ()
    topic_prefix: str = ""
    #: Event type name -> topic, replacing ``<prefix><type>`` for that type (used as given).
    topics: Mapping[str, str] = field(default_factory=dict)
    #: Topic of plain JSON messages from outside producers -> the Event type (class or name).
    ingress: Mapping[str, type[Event] | str] = field(default_factory=dict)
    #: Kafka's idempotent producer (the test broker does not implement InitProducerId).
    idempotent: bool = False
    #: Name of the relay's cursor and lock: relays of one core to one cluster share it.
    relay_name: str = "kafka"
    #: Events per relay batch, and messages per ingress round.
    batch_size: int = 500
    #: Payload bytes per batch, kept below the producer's batch size, so the events a batch sends
    #: to one partition travel in one produce batch (acknowledged or failed together).
    batch_bytes: int = 512 * 1024
    #: A batch without an acknowledgement for this long is reported (once) as a stall.
    stall_warning: float = 5.0
    #: Consumer group of the ingress (default ``vmsdb.<service>[+<service>...]``).
    group_id: str | None = None
    poll_interval: float = 0.5
    #: How long the broker may hold a fetch open when there is nothing new. It adds to every
    #: cross-core hop's latency (a median of about a quarter of it, measured with tansu); 20 ms
    #: keeps that small at the cost of about 50 empty fetches a second per idle consumer.
    fetch_max_wait_ms: int = 20
    #: Consumer group session timeout; heartbeats go at a third of it. A dead ingress process's
    #: partitions move to another member after this long (tests use about a second).
    session_timeout_ms: int = 10_000

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaOptions:
        if not settings.kafka_bootstrap:
            raise KafkaSetupError("the Kafka transport needs VMSDB_KAFKA_BOOTSTRAP (kafka_bootstrap)")

        def extra(name: str, default: Any) -> Any:
            value = getattr(settings, name, None)
            return default if value is None else value

        return cls(
            bootstrap=settings.kafka_bootstrap,
            relay=settings.kafka_relay,
            remote=tuple(settings.kafka_remote),
            topic_prefix=settings.kafka_topic_prefix,
            topics=dict(extra("kafka_topics", {})),
            ingress=dict(extra("kafka_ingress", {})),
            idempotent=bool(extra("kafka_idempotence", False)),
            relay_name=str(extra("kafka_relay_name", "kafka")),
            batch_size=int(extra("kafka_batch_size", 500)),
            stall_warning=float(extra("kafka_stall_warning", 5.0)),
            group_id=extra("kafka_group_id", None),
            session_timeout_ms=int(extra("kafka_session_timeout_ms", 10_000)),
            poll_interval=settings.poll_interval,
        )

    def topic_for(self, event_type: str) -> str:
        """The topic events of ``event_type`` are published to."""
        mapped = self.topics.get(event_type)
        return sanitize_topic(mapped if mapped is not None else self.topic_prefix + event_type)
