"""Log rows into Kafka messages, and Kafka messages back into log records (or dead letters).

A relayed message is the event's JSON as value, its partition key as key (so one key stays in one
partition, hence in order) and the event's identity in headers. On the way in, a message with the
``vmsdb-event-id`` header is an event of this framework from another core and keeps its id; a
message without it is a plain JSON message from an outside producer, and its id is derived from
where it sits in Kafka (uuid5 of topic/partition/offset), so reading it twice inserts it once.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dbcore.eventlog import EventRecord
from dbcore.relay import DeadInput, LogRow
from framework._internal.events import Event
from framework._internal.kafka.options import (
    HEADER_CAUSATION,
    HEADER_CORRELATION,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_POSITION,
    HEADER_PRODUCER,
    HEADER_TRACEPARENT,
    HEADER_XID,
)

__all__ = [
    "FOREIGN_NAMESPACE",
    "PROTOCOL_SUBSCRIBER",
    "Incoming",
    "Outgoing",
    "decode",
    "encode",
    "raw_text",
    "source_of",
]

#: Namespace of the ids given to foreign messages.
FOREIGN_NAMESPACE = uuid.UUID("6f1f7a4e-2d7c-5b8e-9a51-6b6d73646b66")

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    row: LogRow


def encode(row: LogRow, topic: str) -> Outgoing:
    """The Kafka message for a relayed log row."""
    assert row.payload is not None, "only this core's own events are relayed"
    headers: Headers = [
        (HEADER_EVENT_ID, str(row.id).encode()),
        (HEADER_EVENT_TYPE, row.type.encode()),
        (HEADER_XID, str(row.xid).encode()),
        (HEADER_POSITION, str(row.position).encode()),
    ]
    if row.producer is not None:
        headers.append((HEADER_PRODUCER, row.producer.encode()))
    if row.correlation_id is not None:
        headers.append((HEADER_CORRELATION, row.correlation_id.encode()))
    if row.causation_id is not None:
        headers.append((HEADER_CAUSATION, str(row.causation_id).encode()))
    if row.trace_context is not None:
        headers.append((HEADER_TRACEPARENT, row.trace_context.encode()))
    key = None if row.key is None else row.key.encode()
    return Outgoing(topic=topic, key=key, value=row.payload.encode(), headers=headers, row=row)


@dataclass(frozen=True, slots=True)
class Incoming:
    """What one consumed message becomes: an event for the log, a dead letter, or nothing
    (an event type no service here handles). ``event_type`` is set for events."""

    event: EventRecord | None = None
    dead: DeadInput | None = None

    @property
    def event_type(self) -> str | None:
        return None if self.event is None else self.event.type


def source_of(topic: str, partition: int, offset: int) -> str:
    return f"kafka:{topic}/{partition}/{offset}"


def raw_text(value: bytes | None) -> str:
    """Input as text for the dead letters: UTF-8 if it is, else ``base64:`` and the bytes."""
    if value is None:
        return ""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode("ascii")


def _header(headers: Mapping[str, bytes], name: str) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("utf-8")


def decode(
    message: Any,
    *,
    handled: Mapping[str, tuple[type[Event], str]],
    by_topic: Mapping[str, type[Event]],
    protocol: frozenset[str] = frozenset(),
) -> Incoming:
    """Turn an aiokafka ``ConsumerRecord`` into an :class:`Incoming`.

    ``handled``: event type name -> (Event class, the service that handles it here);
    ``by_topic``: topic -> the Event type of header-less (foreign) messages on it;
    ``protocol``: the core's own protocol event types taken here (``dbcore.reference_events``).
    """
    topic: str = message.topic
    source = source_of(topic, message.partition, message.offset)
    value: bytes | None = message.value
    headers = {k: v for k, v in (message.headers or ())}
    framework_event = HEADER_EVENT_ID in headers
    try:
        type_name = _header(headers, HEADER_EVENT_TYPE) if framework_event else None
    except UnicodeDecodeError:
        type_name = None
    if type_name is not None and type_name in protocol:
        return _protocol_event(message, type_name, headers, source)
    if type_name is not None:
        cls: type[Event] | None = handled[type_name][0] if type_name in handled else None
        if cls is None:
            return Incoming()  # an event type none of this App's remote services handles
    else:
        cls = by_topic.get(topic)
        if cls is None:
            return Incoming()
    subscriber = handled[cls.event_type()][1]

    def dead(error: str) -> Incoming:
        key = None if message.key is None else raw_text(message.key)
        return Incoming(dead=DeadInput(subscriber, cls.event_type(), key, raw_text(value), source, error))

    if value is None:
        return dead("the message has no value (a tombstone); an event needs a JSON payload")
    try:
        event = cls.model_validate_json(value)
    except ValidationError as err:
        return dead(f"payload is not a valid {cls.__name__}: {err}")
    try:
        if framework_event:
            event_id = uuid.UUID(_header(headers, HEADER_EVENT_ID) or "")
            causation = _header(headers, HEADER_CAUSATION)
            correlation = _header(headers, HEADER_CORRELATION)
            producer = _header(headers, HEADER_PRODUCER)
            causation_id = None if causation is None else uuid.UUID(causation)
        else:
            event_id = uuid.uuid5(FOREIGN_NAMESPACE, f"{topic}/{message.partition}/{message.offset}")
            correlation, producer, causation_id = None, None, None
        # W3C trace context, from this framework's relay or any producer that sets it.
        traceparent = _header(headers, HEADER_TRACEPARENT)
    except (ValueError, UnicodeDecodeError) as err:
        return dead(f"malformed vmsdb headers: {err}")
    record = EventRecord(
        id=event_id,
        type=cls.event_type(),
        key=event.partition_key(),
        payload=event.model_dump_json(),
        producer=producer,
        correlation_id=correlation,
        causation_id=causation_id,
        origin=f"kafka:{topic}",
        trace_context=traceparent,
    )
    return Incoming(event=record)


#: The subscriber named on a dead letter of the core's own protocol (no service handles it).
PROTOCOL_SUBSCRIBER = "vms"


def _protocol_event(message: Any, type_name: str, headers: Mapping[str, bytes], source: str) -> Incoming:
    """A reference or recovery protocol event from another core: its JSON object as it came."""
    value: bytes | None = message.value
    key = None if message.key is None else raw_text(message.key)

    def dead(error: str) -> Incoming:
        return Incoming(dead=DeadInput(PROTOCOL_SUBSCRIBER, type_name, key, raw_text(value), source, error))

    try:
        payload = json.loads(value) if value is not None else None
        event_id = uuid.UUID(_header(headers, HEADER_EVENT_ID) or "")
        causation = _header(headers, HEADER_CAUSATION)
        causation_id = None if causation is None else uuid.UUID(causation)
        correlation = _header(headers, HEADER_CORRELATION)
        producer = _header(headers, HEADER_PRODUCER)
    except (ValueError, UnicodeDecodeError) as err:
        return dead(f"malformed {type_name} message: {err}")
    if not isinstance(payload, dict):
        return dead(f"a {type_name} message must hold a JSON object")
    record = EventRecord(
        id=event_id,
        type=type_name,
        key=key,
        payload=json.dumps(payload),
        producer=producer,
        correlation_id=correlation,
        causation_id=causation_id,
        origin=f"kafka:{message.topic}",
    )
    return Incoming(event=record)
