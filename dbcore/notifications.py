"""What the event log's notification says, and how it is read.

Every statement that inserts events notifies channel ``vms_events`` once, at commit (the fan-out
trigger, ``dbcore.eventlog``), with two lines:

```
<subscriber>,<subscriber>,...
<correlation>=<type>|<type>,<correlation>=<type>,...
```

The first names the services with new deliveries; the second each correlation of the inserted
events with the event types inserted in it, so that a process waiting for an outcome looks in
the log only when a type it awaits committed. Service names are identifiers; correlation ids and
event types may hold any character, so ``%``, ``,``, ``=`` and ``|`` are written ``%XX`` in them
(``vms.notify_part``). The second line is ``*`` ("look at every correlation") when the list would
not fit: a payload must stay under 8000 bytes. Other senders (``dbcore.delivery``'s wake-up) send
a subscriber alone, with no second line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = [
    "ANY_CORRELATION",
    "NOTIFY_LIST_LIMIT",
    "NOTIFY_PART_FUNCTION",
    "EventsNotification",
    "parse_events_notification",
]

#: The second line when it does not list the correlations: any of them may have new events.
ANY_CORRELATION = "*"

#: Longest subscribers and correlations a notification lists; past it the second line is "*".
#: A payload of 8000 bytes or more makes pg_notify raise, and the insert that caused it fail.
NOTIFY_LIST_LIMIT = 7000

# "%" first, so that "%2C" in a name comes back as "%2C" and not as ",". Without a search_path
# of its own (every name is qualified or pg_catalog's) so the planner inlines it.
NOTIFY_PART_FUNCTION = """
    CREATE OR REPLACE FUNCTION vms.notify_part(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
        SELECT replace(replace(replace(replace($1, '%', '%25'), ',', '%2C'), '=', '%3D'), '|', '%7C')
    $$
"""


@dataclass(frozen=True, slots=True)
class EventsNotification:
    """One notification of the event log, read.

    ``committed`` maps each correlation to the event types committed in it, ``None`` for a
    correlation whose types are not said (a catalog older than this format); ``committed`` is
    ``None`` itself when the notification could not list them (``*``): any correlation may have
    new events.
    """

    subscribers: tuple[str, ...]
    committed: Mapping[str, frozenset[str] | None] | None


def _name(part: str) -> str:
    return unquote(part) if "%" in part else part


def parse_events_notification(payload: str) -> EventsNotification:
    """Read a ``vms_events`` payload (see the module's docstring)."""
    subscribers, _, listed = payload.partition("\n")
    names = tuple(subscribers.split(",")) if subscribers else ()
    if listed == ANY_CORRELATION:
        return EventsNotification(names, None)
    committed: dict[str, frozenset[str] | None] = {}
    for item in listed.split(",") if listed else ():
        correlation, typed, types = item.partition("=")
        if not typed:  # "<correlation>" alone: its types are not said
            committed[_name(correlation)] = None
            continue
        committed[_name(correlation)] = frozenset(_name(t) for t in types.split("|"))
    return EventsNotification(names, committed)
