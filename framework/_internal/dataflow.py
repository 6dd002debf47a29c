"""Render service descriptors for people: what each service is and how events flow between them.

``dataflow`` turns the ``@Inbound``/``@Outbound`` declarations of a set of services into one
:class:`Flow` per (producer, consumer) pair of every event type. Events no service emits come
from :data:`OUTSIDE` (HTTP requests, ``app.publish``); events no service handles go to it.
The tables are for the terminal (rich), the DOT graph for Graphviz.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from dbcore.descriptor import ServiceDescriptor
from framework._internal.coordination import coordination

__all__ = [
    "OUTSIDE",
    "Flow",
    "coordination_table",
    "dataflow",
    "flow_table",
    "services_table",
    "to_dot",
    "write_graph",
]

OUTSIDE = "(outside)"


@dataclass(frozen=True)
class Flow:
    """Events of type ``event`` go from ``producer`` to ``consumer``'s ``handler``."""

    event: str
    producer: str
    functions: tuple[str, ...]
    consumer: str
    handler: str | None
    precedence: tuple[str, ...]


def dataflow(descriptors: Sequence[ServiceDescriptor]) -> list[Flow]:
    """All flows, sorted by producer, event, consumer and handler."""
    producers: dict[str, dict[str, list[str]]] = {}
    consumers: dict[str, list[tuple[str, str | None, tuple[str, ...]]]] = {}
    for d in descriptors:
        for out in d.outbound:
            for event in out.events:
                declared = producers.setdefault(event, {}).setdefault(d.name, [])
                if out.function not in declared:
                    declared.append(out.function)
        for inb in d.inbound:
            consumers.setdefault(inb.event, []).append((d.name, inb.handler, inb.precedence))
    flows: list[Flow] = []
    for event in producers.keys() | consumers.keys():
        sources = [(p, tuple(fs)) for p, fs in producers.get(event, {}).items()]
        sinks = consumers.get(event) or [(OUTSIDE, None, ())]
        for producer, functions in sources or [(OUTSIDE, ())]:
            for consumer, handler, precedence in sinks:
                flows.append(Flow(event, producer, functions, consumer, handler, precedence))
    return sorted(flows, key=lambda f: (f.producer, f.event, f.consumer, f.handler or ""))


def _lines(items: Iterable[str]) -> Text:
    """Cell text, one item per line; a Text so names are never read as rich markup."""
    return Text("\n".join(items))


def _after(precedence: tuple[str, ...]) -> str:
    return f" (after {', '.join(precedence)})" if precedence else ""


def _references(d: ServiceDescriptor) -> list[str]:
    """What ``d`` gives (referenceable tables, by key) and holds (reference columns) in G9."""
    gives = [f"{r.table} ({', '.join(r.key)}) referenceable" for r in d.referenceable]
    holds = [f"{c.table}.{c.column} → {c.target_service}.{c.target_table}" for c in d.reference_columns]
    return gives + holds


def services_table(descriptors: Sequence[ServiceDescriptor]) -> Table:
    """One row per service: schema and role, tables, events, leases, queries, references,
    dependencies."""
    table = Table(title="Services", show_lines=True)
    columns = ("service", "schema / role", "tables", "inbound", "outbound", "leases", "queries")
    for column in (*columns, "references", "dependencies"):
        table.add_column(column)
    for d in descriptors:
        table.add_row(
            Text(d.name, style="bold"),
            _lines([d.schema_name, d.role]),
            _lines(f"{t.name} ({t.entity}){' [exported]' if t.exported else ''}" for t in d.tables),
            _lines(f"{i.event} → {i.handler}{_after(i.precedence)}" for i in d.inbound),
            _lines(f"{o.function}: {', '.join(o.events)}" for o in d.outbound),
            _lines(f"{q.function}({', '.join(q.params)})" for q in d.leases),
            _lines(f"{q.function}({', '.join(q.params)})" for q in d.queries),
            _lines(_references(d)),
            _lines(d.dependencies),
        )
    return table


def _producer_label(flow: Flow) -> str:
    if not flow.functions:
        return flow.producer
    return ", ".join(f"{flow.producer}.{fn}" for fn in flow.functions)


def flow_table(descriptors: Sequence[ServiceDescriptor]) -> Table:
    """One row per flow: producer → event → consumer.handler, and the handler's precedence."""
    table = Table(title="Event dataflow")
    for column in ("producer", "", "event", "", "consumer", "after"):
        table.add_column(column)
    for f in dataflow(descriptors):
        consumer = f.consumer if f.handler is None else f"{f.consumer}.{f.handler}"
        table.add_row(
            Text(_producer_label(f)),
            "→",
            Text(f.event, style="bold"),
            "→",
            Text(consumer),
            _lines(f.precedence),
        )
    return table


def coordination_table(descriptors: Sequence[ServiceDescriptor]) -> Table | None:
    """The dataflow's warnings (``coordination.py``), one per row; ``None`` when there are none."""
    findings = coordination(descriptors)
    if not findings:
        return None
    table = Table(title="Coordination warnings", show_lines=True)
    for column in ("kind", "events", "services", "warning"):
        table.add_column(column)
    for f in findings:
        table.add_row(
            Text(f.kind, style="yellow"), _lines(f.events), _lines(f.services), Text(f.message)
        )
    return table


def _quote(value: str) -> str:
    """A DOT double-quoted ID: backslashes and quotes escaped, newlines as ``\\n``."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def to_dot(descriptors: Sequence[ServiceDescriptor]) -> str:
    """A Graphviz digraph: services as boxes, one labelled edge per (producer, consumer, event)."""
    flows = dataflow(descriptors)
    lines = [
        "digraph vmsdb {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    for d in descriptors:
        label = f"{d.name}\n{len(d.tables)} table(s)"
        lines.append(f"  {_quote(d.name)} [label={_quote(label)}];")
    if any(OUTSIDE in (f.producer, f.consumer) for f in flows):
        lines.append(f"  {_quote(OUTSIDE)} [shape=ellipse, style=dashed];")
    edges: dict[tuple[str, str, str], list[Flow]] = {}
    for f in flows:
        edges.setdefault((f.producer, f.consumer, f.event), []).append(f)
    for (producer, consumer, event), group in edges.items():
        notes = [f"→ {f.handler}{_after(f.precedence)}" for f in group if f.handler is not None]
        label = "\n".join([event, *notes])
        style = ", style=dashed" if any(f.precedence for f in group) else ""
        lines.append(f"  {_quote(producer)} -> {_quote(consumer)} [label={_quote(label)}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(descriptors: Sequence[ServiceDescriptor], stem: Path) -> list[Path]:
    """Write ``<stem>.dot`` and, when Graphviz's ``dot`` is on PATH, ``<stem>.svg``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    dot_path = stem.parent / f"{stem.name}.dot"
    dot_path.write_text(to_dot(descriptors), encoding="utf-8")
    written = [dot_path]
    executable = shutil.which("dot")
    if executable is None:
        return written
    svg_path = stem.parent / f"{stem.name}.svg"
    try:
        result = subprocess.run(
            [executable, "-Tsvg", "-o", str(svg_path), str(dot_path)],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise RuntimeError(f"could not run {executable}: {exc}") from exc
    if result.returncode != 0:
        raise RuntimeError(
            f"{executable} -Tsvg failed with exit code {result.returncode} on {dot_path}:\n"
            f"{result.stderr.strip()}"
        )
    written.append(svg_path)
    return written
