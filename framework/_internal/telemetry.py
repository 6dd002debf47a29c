"""Tracing with OpenTelemetry (the optional extra ``vmsdb[otel]``), and the log fields.

Tracing is on when the OpenTelemetry API is installed and either the application set a tracer
provider (``opentelemetry-instrument``, or its own code) or ``OTEL_TRACES_EXPORTER`` names an
exporter; then the SDK is set up from the standard ``OTEL_*`` variables alone
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ...). ``OTEL_SDK_DISABLED=true`` turns it off.

Off (the default), :data:`tracer` is ``None`` and every hook below costs one check of it: no
OpenTelemetry import, no span, no context. On, each event carries its sender's W3C
``traceparent`` in the log (``vms.events.trace_context``) and in Kafka headers, and the handler's
span is a child of it: one business transaction is one trace, across services and cores.

Log records of the ``vmsdb`` loggers carry ``trace_id``, ``correlation_id`` and ``event_id``
attributes (empty strings when there are none), tracing on or off: see :func:`install_log_fields`.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from framework._internal.context import correlation, current

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.context import Context
    from opentelemetry.trace import Tracer, TracerProvider

    from dbcore.delivery import Claimed
    from framework._internal.descriptors import CallPlan

__all__ = [
    "batch_span",
    "configure",
    "delivery_context",
    "handling",
    "install_log_fields",
    "instrument_fastapi",
    "traced",
    "traceparent",
    "tracer",
    "tracing_with",
]

T = TypeVar("T")

log = logging.getLogger("vmsdb.telemetry")

#: The framework's tracer while tracing is on; ``None`` while it is off (the hot path's test).
tracer: Tracer | None = None
_provider: TracerProvider | None = None

#: The delivery being handled in this context (for log records).
_delivery: contextvars.ContextVar[Claimed | None] = contextvars.ContextVar("vmsdb_delivery", default=None)


# -- turning it on ------------------------------------------------------------------------------


def configure() -> bool:
    """Turn tracing on if OpenTelemetry is installed and configured (module docstring)."""
    global tracer, _provider
    if tracer is not None:
        return True
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    try:
        from opentelemetry import trace
    except ImportError:
        return False
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):  # nobody set one: the environment may
        exporters = [e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
        if not exporters or exporters == ["none"]:
            return False
        provider = _provider_from_environment(exporters)
        trace.set_tracer_provider(provider)
    _provider = provider
    tracer = provider.get_tracer("vmsdb")
    return True


def _provider_from_environment(exporters: Sequence[str]) -> TracerProvider:
    """An SDK provider with the named exporters (entry points ``opentelemetry_traces_exporter``,
    as ``opentelemetry-instrument`` finds them); resource and sampler from ``OTEL_*``."""
    from importlib.metadata import entry_points

    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as err:
        raise RuntimeError(
            "OTEL_TRACES_EXPORTER is set but the OpenTelemetry SDK is missing: pip install 'vmsdb[otel]'"
        ) from err
    provider = SdkTracerProvider(resource=Resource.create())
    available = {ep.name: ep for ep in entry_points(group="opentelemetry_traces_exporter")}
    for name in exporters:
        if name == "none":
            continue
        if name not in available:
            raise RuntimeError(
                f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed (known: "
                f"{', '.join(sorted(available)) or 'none'}); for 'otlp', pip install 'vmsdb[otel]'"
            )
        provider.add_span_processor(BatchSpanProcessor(available[name].load()()))
    return provider


@contextmanager
def tracing_with(provider: TracerProvider) -> Iterator[None]:
    """Trace with ``provider`` for the length of the block (tests: an in-memory exporter),
    whatever the process-wide provider is; tracing is off again afterwards."""
    global tracer, _provider
    saved = tracer, _provider
    tracer, _provider = provider.get_tracer("vmsdb"), provider
    try:
        yield
    finally:
        tracer, _provider = saved


# -- the trace context that travels with events -------------------------------------------------


def traceparent() -> str | None:
    """The current span as a W3C ``traceparent`` (stored with each event sent); ``None`` when
    tracing is off or no span is current."""
    if tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


@contextmanager
def continue_trace(parent: str | None) -> Iterator[None]:
    """Run the block as part of the trace ``parent`` (a ``trace_context()`` taken earlier, e.g. in
    the handler that recorded work to finish outside its transaction); a no-op when tracing is
    off or ``parent`` is ``None``."""
    context = _parent(parent) if tracer is not None else None
    if context is None:
        yield
        return
    from opentelemetry import context as otel_context

    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def _parent(value: str | None) -> Context | None:
    if not value:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": value})


# -- spans ----------------------------------------------------------------------------------------


async def traced(awaitable: Awaitable[T], name: str, attributes: Mapping[str, Any]) -> T:
    """Await ``awaitable`` in a span ``name`` (an internal span, child of the current one)."""
    if tracer is None:
        return await awaitable
    with tracer.start_as_current_span(name, attributes=dict(attributes)):
        return await awaitable


def traced_call(awaitable: Awaitable[T], service: str, call: CallPlan) -> Awaitable[T]:
    """A service function's call (``@Transactional``, ``@Lease``, ``@Query``) in its span."""
    if tracer is None:
        return awaitable
    spec = call.spec
    kind = "query" if spec.query is not None else "lease" if spec.lease is not None else "transaction"
    attributes: dict[str, Any] = {"vmsdb.service": service, "vmsdb.function": spec.name, "vmsdb.kind": kind}
    if call.tx is not None:
        attributes["vmsdb.isolation"] = call.tx.isolation
    return traced(awaitable, f"{service}.{spec.name}", attributes)


class delivery_context:  # lower case: used as a function: ``with delivery_context(item):``
    """While a worker handles ``item`` (retry and dead-letter included): its event id,
    correlation id and trace id go on log records, and calls carry its correlation.

    A class rather than a generator: it is on every handler's path, and this costs half.
    """

    __slots__ = ("_correlated", "_item", "_token")

    def __init__(self, item: Claimed) -> None:
        self._item = item

    def __enter__(self) -> None:
        self._token = _delivery.set(self._item)
        self._correlated = correlation.set(self._item.correlation_id)

    def __exit__(self, *exc: object) -> None:
        correlation.reset(self._correlated)
        _delivery.reset(self._token)


async def handling(item: Claimed, service: str, max_attempts: int, run: Awaitable[T]) -> T:
    """Run a handler (``run``) for delivery ``item``; on, in a span that is a child of the
    span that sent the event, wherever that was."""
    if tracer is None:
        return await run
    from opentelemetry.trace import SpanKind

    attributes: dict[str, Any] = {
        "vmsdb.service": service,
        "vmsdb.event_type": item.event_type,
        "vmsdb.event_id": str(item.event_id),
        "vmsdb.attempt": item.attempts,
        "vmsdb.correlation_id": item.correlation_id or "",
    }
    with tracer.start_as_current_span(
        f"{service} handle {item.event_type}",
        context=_parent(item.trace_context),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        try:
            result = await run
        except Exception:
            outcome = "dead-lettered" if item.attempts >= max_attempts else "retried"
            span.set_attribute("vmsdb.outcome", outcome)
            raise
        span.set_attribute("vmsdb.outcome", "handled")
        return result


class _Traced(Protocol):
    @property
    def trace_context(self) -> str | None: ...


@contextmanager
def batch_span(name: str, events: Sequence[_Traced], attributes: Mapping[str, Any]) -> Iterator[None]:
    """A span for a batch of events (relay publish, ingress insert), linked to each event's
    sender (at most 64 links: a batch span is no place for thousands)."""
    if tracer is None:
        yield
        return
    from opentelemetry import trace

    links = []
    for event in events[:64]:
        parent = _parent(event.trace_context)
        if parent is not None:
            links.append(trace.Link(trace.get_current_span(parent).get_span_context()))
    with tracer.start_as_current_span(name, links=links, attributes=dict(attributes)):
        yield


def instrument_fastapi(api: FastAPI) -> None:
    """Spans for ``api``'s HTTP routes (``opentelemetry-instrumentation-fastapi``), when on."""
    if not configure():
        return
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError:
        log.warning("tracing is on, but HTTP routes are not traced: pip install 'vmsdb[otel]'")
        return
    FastAPIInstrumentor.instrument_app(api, tracer_provider=_provider)


# -- log records ------------------------------------------------------------------------------------

_installed = False


def install_log_fields() -> None:
    """Give every log record ``trace_id``, ``correlation_id`` and ``event_id`` (format strings
    can use ``%(trace_id)s``; JSON formatters pick them up). Installed once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        tx = current()
        record.correlation_id = (tx.correlation_id if tx is not None else None) or correlation.get() or ""
        delivery = _delivery.get()
        record.event_id = str(delivery.event_id) if delivery is not None else ""
        record.trace_id = _trace_id(delivery)
        return record

    logging.setLogRecordFactory(factory)


def _trace_id(delivery: Claimed | None) -> str:
    """The current span's trace; else the trace of the event being handled (its span has
    ended by the time a retry or a dead letter is logged, but the trace is the same)."""
    if tracer is not None:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            return f"{ctx.trace_id:032x}"
    if delivery is not None and delivery.trace_context:
        parts = delivery.trace_context.split("-")
        return parts[1] if len(parts) == 4 else ""
    return ""
