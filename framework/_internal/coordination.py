"""Holistic coordination (vision paper §4): what the dataflow of all services says is wrong.

Knowing every service's inbound and outbound events, the framework derives the dataflow across
services at start-up and reports, as warnings (``vmsdb services`` lists them, the App logs them):

- ``unconsumed``: an event type a service emits that no registered service handles (it goes
  nowhere, unless something outside the App reads the event log or its Kafka topic);
- ``unproduced``: a handler whose event type no registered service emits (it runs only on
  events published from outside: ``app.publish``, HTTP, Kafka ingress);
- ``cycle``: handlers that feed each other, ``h1 -emits E1-> h2 -emits E2-> ... -> h1``: one
  event can start a chain that never ends unless some handler stops emitting;
- ``precedence``: ``@Inbound(A, precedence=B)`` where A has no path by which a registered service
  emits it. The constraint orders A before B, so with no A ever emitted it orders nothing
  (unless A is published from outside the App).

The analysis reads descriptors only; it never refuses a set of services.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from dbcore.descriptor import ServiceDescriptor

__all__ = ["Finding", "Kind", "coordination"]

Kind = Literal["unconsumed", "unproduced", "cycle", "precedence"]


@dataclass(frozen=True, order=True)
class Finding:
    """One thing the dataflow says: its kind, the event types and services involved, why."""

    kind: Kind
    events: tuple[str, ...]
    services: tuple[str, ...]
    message: str


Handler = tuple[str, str]  # (service, handler function)
Step = tuple[Handler, str]  # a handler, and the event by which it feeds the next one


def _emitters(descriptors: Sequence[ServiceDescriptor]) -> dict[str, list[Handler]]:
    emitted: dict[str, list[Handler]] = {}
    for d in descriptors:
        for out in d.outbound:
            for event in out.events:
                emitted.setdefault(event, []).append((d.name, out.function))
    return emitted


def _consumers(descriptors: Sequence[ServiceDescriptor]) -> dict[str, list[Handler]]:
    handled: dict[str, list[Handler]] = {}
    for d in descriptors:
        for inb in d.inbound:
            handled.setdefault(inb.event, []).append((d.name, inb.handler))
    return handled


def _cycles(descriptors: Sequence[ServiceDescriptor]) -> list[list[Step]]:
    """Cycles of the handler graph (h -> h' when h emits an event h' handles), the shortest
    through each handler not already in a reported one, each as ``[(handler, event), ...]``."""
    handled = _consumers(descriptors)
    edges: dict[Handler, list[Step]] = {}
    for d in descriptors:
        handlers = {inb.handler for inb in d.inbound}
        for out in d.outbound:
            if out.function not in handlers:
                continue  # a function nobody's event starts: it cannot close a loop
            for event in out.events:
                for target in handled.get(event, ()):
                    edges.setdefault((d.name, out.function), []).append((target, event))
    found: list[list[Step]] = []
    done: set[Handler] = set()  # handlers already shown to be in a reported cycle, or in none
    for start in sorted(edges):
        if start in done:
            continue
        path = _path_back(edges, start)
        if path is None:
            done.add(start)
            continue
        found.append(path)
        done.update(h for h, _ in path)
    return found


def _path_back(edges: dict[Handler, list[Step]], start: Handler) -> list[Step] | None:
    """The shortest chain of events from ``start`` back to itself (breadth first), if any."""
    parent: dict[Handler, Step] = {}
    frontier = [start]
    while frontier:
        following: list[Handler] = []
        for node in frontier:
            for target, event in sorted(edges.get(node, ())):
                if target == start:
                    path = [(node, event)]
                    while node != start:
                        node, via = parent[node]
                        path.append((node, via))
                    return path[::-1]
                if target not in parent:
                    parent[target] = (node, event)
                    following.append(target)
        frontier = following
    return None


def coordination(descriptors: Sequence[ServiceDescriptor]) -> list[Finding]:
    """Every warning the dataflow of ``descriptors`` gives, sorted by kind then event."""
    emitted, handled = _emitters(descriptors), _consumers(descriptors)
    findings: list[Finding] = []
    for event, sources in emitted.items():
        if event not in handled:
            by = sorted({s for s, _ in sources})
            functions = ", ".join(sorted(f"{s}.{f}" for s, f in sources))
            findings.append(
                Finding(
                    "unconsumed",
                    (event,),
                    tuple(by),
                    f"{event} is emitted ({functions}) but no registered service handles it",
                )
            )
    for event, sinks in handled.items():
        if event not in emitted:
            handlers = ", ".join(sorted(f"{s}.{h}" for s, h in sinks))
            findings.append(
                Finding(
                    "unproduced",
                    (event,),
                    tuple(sorted({s for s, _ in sinks})),
                    f"{handlers} handle(s) {event}, which no registered service emits: it runs "
                    "only on events published from outside the App",
                )
            )
    for cycle in _cycles(descriptors):
        chain = " -> ".join(f"{s}.{h} -[{event}]" for (s, h), event in cycle)
        (first_service, first_handler), _ = cycle[0]
        findings.append(
            Finding(
                "cycle",
                tuple(event for _, event in cycle),
                tuple(sorted({s for (s, _), _ in cycle})),
                f"cycle in the dataflow: {chain} -> {first_service}.{first_handler}; one event "
                "can start a chain of handlers that never ends",
            )
        )
    for d in descriptors:
        for inb in d.inbound:
            if inb.precedence and inb.event not in emitted:
                after = ", ".join(inb.precedence)
                findings.append(
                    Finding(
                        "precedence",
                        (inb.event, *inb.precedence),
                        (d.name,),
                        f"{d.name}.{inb.handler} orders {inb.event} before {after}, but no "
                        f"registered service emits {inb.event}: it can never precede {after} "
                        "unless it is published from outside the App",
                    )
                )
    return sorted(findings)
