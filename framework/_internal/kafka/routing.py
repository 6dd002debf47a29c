"""Which topics the ingress reads, what each message there becomes, and which topics hold it back.

Worked out once at start-up from the App's service plans and the Kafka options.
"""

from __future__ import annotations

import graphlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dbcore.reference_events import PROTOCOL_EVENTS
from framework._internal.descriptors import ServicePlan
from framework._internal.events import Event
from framework._internal.kafka.options import KafkaOptions, KafkaSetupError, sanitize_topic

__all__ = ["Routing"]


@dataclass(frozen=True)
class Routing:
    """``handled``: event type -> (Event class, the service that handles it here).
    ``by_topic``: topic -> Event type of header-less (foreign) messages on it.
    ``before``: event type B -> topics holding the events that must be inserted before a B
    (every ``A`` of an ``@Inbound(A, precedence=B)`` of a remote service).
    ``protocol``: the reference and recovery protocol's event types, when a service of this App
    declares references (``dbcore.reference_events``): they are read from Kafka too, so that
    references reach across cores.
    ``topics``: every topic the ingress subscribes to.
    """

    handled: Mapping[str, tuple[type[Event], str]]
    by_topic: Mapping[str, type[Event]]
    before: Mapping[str, frozenset[str]]
    topics: tuple[str, ...]
    services: tuple[str, ...]
    protocol: frozenset[str] = frozenset()

    @property
    def group_id(self) -> str:
        """``vmsdb.<service>``. Several remote services of one App share one consumer (and group):
        an ingested event fans out to *every* local subscriber, so the precedence of each must
        be held by the one consumer that inserts it."""
        return "vmsdb." + "+".join(self.services)

    @classmethod
    def build(cls, plans: Sequence[ServicePlan], options: KafkaOptions) -> Routing:
        names = {p.descriptor.name for p in plans}
        unknown = sorted(set(options.remote) - names)
        if unknown:
            raise KafkaSetupError(
                f"kafka_remote names {', '.join(unknown)}, which this App does not run "
                f"(its services: {', '.join(sorted(names)) or 'none'})"
            )
        # Every event type an @Inbound handler of this App takes, and which service takes it.
        local: dict[str, tuple[type[Event], str]] = {}
        remote: dict[str, tuple[type[Event], str]] = {}
        before_types: dict[str, set[str]] = {}
        for plan in sorted(plans, key=lambda p: p.descriptor.name):
            service = plan.descriptor.name
            for spec in plan.functions.values():
                if spec.inbound is None:
                    continue
                event = spec.inbound.event
                local.setdefault(event.event_type(), (event, service))
                if service in options.remote:
                    remote.setdefault(event.event_type(), (event, service))
                    for later in spec.inbound.precedence:
                        before_types.setdefault(later.event_type(), set()).add(event.event_type())

        _refuse_cycles(before_types)

        foreign: dict[str, type[Event]] = {}
        for topic, target in options.ingress.items():
            name = target if isinstance(target, str) else target.event_type()
            if name not in local:
                raise KafkaSetupError(
                    f"kafka_ingress maps topic {topic!r} to {name}, but no @Inbound handler of this "
                    f"App takes {name} (handled here: {', '.join(sorted(local)) or 'none'})"
                )
            foreign[sanitize_topic(topic)] = local[name][0]

        handled = dict(remote)
        for event in foreign.values():
            handled.setdefault(event.event_type(), local[event.event_type()])

        # Events of this framework arrive on their type's topic. A header-less message there is
        # a foreign message of that type, when the topic carries one type only.
        framework_topics: dict[str, list[str]] = {}
        for name in remote:
            framework_topics.setdefault(options.topic_for(name), []).append(name)
        by_topic = {t: remote[names[0]][0] for t, names in framework_topics.items() if len(names) == 1}
        by_topic.update(foreign)

        def topics_of(name: str) -> set[str]:
            found = {options.topic_for(name)} if name in remote else set()
            return found | {t for t, event in foreign.items() if event.event_type() == name}

        before = {
            later: frozenset(t for name in earlier for t in topics_of(name))
            for later, earlier in before_types.items()
        }
        # The protocol's events, when this App has references to give or to hold; consumed by
        # every core (each acts only on what concerns its own services).
        protocol = (
            frozenset(PROTOCOL_EVENTS)
            if any(p.descriptor.declares_references for p in plans)
            else frozenset()
        )
        protocol_topics = {options.topic_for(name) for name in protocol}
        services = (
            set(options.remote)
            or {handled[e.event_type()][1] for e in foreign.values()}
            or ({p.descriptor.name for p in plans} if protocol else set())
        )
        return cls(
            handled=handled,
            by_topic=by_topic,
            before=before,
            topics=tuple(sorted(set(framework_topics) | set(foreign) | protocol_topics)),
            services=tuple(sorted(services)),
            protocol=protocol,
        )


def _refuse_cycles(before: Mapping[str, set[str]]) -> None:
    """The ingress holds a B until the A's that precede it are in; with A's held for B's too
    (a cycle, over one service or several), each would wait for the other for ever."""
    try:
        graphlib.TopologicalSorter(before).prepare()
    except graphlib.CycleError as err:
        cycle = " -> ".join(err.args[1])
        raise KafkaSetupError(
            f"@Inbound precedence of the Kafka-fed services forms a cycle ({cycle}): the ingress "
            "would hold each type until the other is in, for ever; remove one of the precedence "
            "declarations (in-database delivery, without Kafka, orders such a cycle by commit)"
        ) from None
