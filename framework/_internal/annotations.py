"""The annotations: ``@Inbound``, ``@Outbound``, ``@Transactional``, ``@Lease`` and ``@Query``.

An annotation only records metadata, at import time. Stacked annotations share one wrapper (a
``wrapt.FunctionWrapper``): the first one applied creates it, the others replace its (immutable)
spec with an extended copy, so a call goes through exactly one wrapper however many annotations a
function carries. Each App reads the specs once at start-up into descriptors and call plans of
its own, writing nothing back; a call does no inspection.

Introspection survives: ``inspect.iscoroutinefunction``, ``inspect.signature`` and ``__name__``
see the user's function, also when a FastAPI route decorator is stacked on top.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar, cast, overload

import wrapt

from dbcore.errors import LanguageError
from dbcore.lease_language import LeaseSpec, parse_lease
from framework._internal.errors import AnnotationError, ServiceCallError
from framework._internal.events import Event

__all__ = [
    "FunctionSpec",
    "Inbound",
    "InboundSpec",
    "Lease",
    "Outbound",
    "Query",
    "ServiceFunction",
    "Transactional",
    "TransactionalSpec",
]

F = TypeVar("F", bound=Callable[..., Any])

TX_TYPES = ("RW", "RO")
ISOLATIONS = ("serializable", "snapshot", "read_committed")

#: What an @Inbound or @Outbound function without its own @Transactional runs in: the handler's
#: effects and its inbox mark (or its sent events) must commit together, so it needs a transaction.
DEFAULT_TRANSACTION_TYPE: Literal["RW"] = "RW"
DEFAULT_ISOLATION: Literal["read_committed"] = "read_committed"
DEFAULT_MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class TransactionalSpec:
    type: Literal["RW", "RO"]
    isolation: Literal["serializable", "snapshot", "read_committed"]
    max_attempts: int
    explicit: bool = True


@dataclass(frozen=True)
class InboundSpec:
    event: type[Event]
    precedence: tuple[type[Event], ...]
    max_attempts: int
    blocking: bool = False
    #: Up to this many of the handler's claimed deliveries run one after another in one
    #: transaction with one commit (1: each in its own); see ``Inbound``.
    group_commit: int = 1


@dataclass(frozen=True, eq=False)
class FunctionSpec:
    """Everything the annotations say about one service function.

    Immutable: each annotation applied replaces its wrapper's spec, and the App reads it into
    call plans of its own (``framework._internal.descriptors.CallPlan``) instead of writing onto it.
    Compared and hashed by identity, so a call finds its plan with one dict lookup.
    """

    function: Callable[..., Any]
    qualname: str
    signature: inspect.Signature
    inbound: InboundSpec | None = None
    outbound: tuple[type[Event], ...] = ()
    transactional: TransactionalSpec | None = None
    lease: LeaseSpec | None = None
    query: str | None = None

    @property
    def name(self) -> str:
        return self.function.__name__

    @property
    def params(self) -> tuple[str, ...]:
        """Parameter names a caller passes (``self`` excluded)."""
        return tuple(p for p in self.signature.parameters if p != "self")

    def effective_transaction(self) -> TransactionalSpec | None:
        """The transaction a call runs in: declared, implied by @Inbound/@Outbound, or none."""
        if self.transactional is not None:
            return self.transactional
        if self.inbound is not None or self.outbound:
            return TransactionalSpec(
                DEFAULT_TRANSACTION_TYPE, DEFAULT_ISOLATION, DEFAULT_MAX_ATTEMPTS, explicit=False
            )
        return None


class ServiceFunction(wrapt.FunctionWrapper[..., Any]):
    """The one wrapper around an annotated service function; holds its :class:`FunctionSpec`."""

    def __init__(self, wrapped: Callable[..., Any], spec: FunctionSpec) -> None:
        def invoke(
            wrapped: Callable[..., Any],
            instance: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> Any:
            # The spec as the last annotation left it (each one replaces it).
            spec = self.vms_spec
            runtime = getattr(instance, "_vms_runtime", None)
            if runtime is None:
                return _unattached(spec)
            # Returns the coroutine: the call stays awaitable and introspection sees the
            # user's async function, not this wrapper.
            return runtime.call(spec, wrapped, args, kwargs)

        super().__init__(wrapped, invoke)
        self._self_spec = spec

    @property
    def vms_spec(self) -> FunctionSpec:
        spec: FunctionSpec = self._self_spec
        return spec

    def vms_revise(self, **changes: Any) -> None:
        """Replace the spec with a copy carrying ``changes`` (an annotation being applied)."""
        self._self_spec = replace(self.vms_spec, **changes)


async def _unattached(spec: FunctionSpec) -> Any:
    raise ServiceCallError(
        f"{spec.qualname} was called on an object that is not attached to a running App; "
        "call it as app.service(ServiceClass).function(...)"
    )


def spec_of(obj: Any) -> FunctionSpec | None:
    """The spec of an annotated function (bound or not), or ``None``."""
    spec = getattr(obj, "_self_spec", None)
    if isinstance(spec, FunctionSpec):
        return spec
    parent = getattr(obj, "_self_parent", None)
    spec = getattr(parent, "_self_spec", None)
    return spec if isinstance(spec, FunctionSpec) else None


def _annotate(fn: Any, annotation: str) -> ServiceFunction:
    """Return ``fn``'s wrapper, creating it if this is the first annotation applied."""
    if isinstance(fn, ServiceFunction):
        return fn
    name = getattr(fn, "__qualname__", repr(fn))
    if isinstance(fn, (staticmethod, classmethod)) or not callable(fn):
        raise AnnotationError(name, f"@{annotation} applies to an async method of a Service")
    if not inspect.iscoroutinefunction(fn):
        raise AnnotationError(
            name,
            f"@{annotation} needs an async function (async def): its database work is "
            "asynchronous, and a sync function would block the event loop",
        )
    return ServiceFunction(fn, FunctionSpec(fn, name, inspect.signature(fn)))


def _event_types(value: Any, function: str, what: str) -> tuple[type[Event], ...]:
    items: Iterable[Any] = value if isinstance(value, (list, tuple, set, frozenset)) else (value,)
    result = []
    for item in items:
        if not (isinstance(item, type) and issubclass(item, Event)) or item is Event:
            raise AnnotationError(
                function, f"{what} must be an Event subclass (or a list of them), got {item!r}"
            )
        result.append(item)
    if not result:
        raise AnnotationError(function, f"{what} names no event type")
    return tuple(result)


def _needs_argument(value: Any, annotation: str, example: str) -> None:
    """A bare ``@Inbound`` would silently replace the method with the decorator's inner function."""
    if inspect.isfunction(value) or isinstance(value, ServiceFunction):
        name = getattr(value, "__qualname__", repr(value))
        raise AnnotationError(name, f"@{annotation} needs its argument: @{annotation}({example})")


def _not_pushed_down(spec: FunctionSpec, annotation: str) -> None:
    if spec.lease is not None or spec.query is not None:
        raise AnnotationError(
            spec.qualname,
            f"@Lease and @Query are API functions run by the core; they cannot also be @{annotation}",
        )


def _check_attempts(value: int, function: str, option: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AnnotationError(function, f"{option} must be a whole number >= 1, got {value!r}")
    return value


def Inbound(
    event: type[Event],
    precedence: type[Event] | Iterable[type[Event]] | None = None,
    *,
    max_attempts: int = 5,
    blocking: bool = False,
    group_commit: int = 1,
) -> Callable[[F], F]:
    """Subscribe the function to ``event``.

    ``precedence=B``: every ``event`` committed before a ``B`` is handled by this service before
    that ``B``. ``max_attempts``: after this many failures the event goes to the dead letters;
    later events of its key then flow on, unless ``blocking=True``: the key waits until the dead
    letter is replayed (or discarded), so no event of a key is ever handled out of order.

    ``group_commit=N``: when deliveries queue up, a worker runs up to ``N`` of this handler's
    (of different keys, each claimable on its own) one after another in ONE transaction and
    acknowledges them with one commit: one ``BEGIN`` and one ``COMMIT`` for ``N`` events instead
    of ``N`` of each. Each event is still handled exactly once (every acknowledgement commits
    with the effects, or none does) and in order per key. If any of them fails, the group is
    rolled back and each event runs again on its own, with its own retries. Meant for short
    handlers that touch rows of their own key; a handler that locks rows shared across keys
    (a counter of a seller, a stock row) should keep the default 1: two groups locking the same
    rows in different orders deadlock, and Postgres breaks that only after ``deadlock_timeout``.
    """
    _needs_argument(event, "Inbound", "MyEvent")

    def apply(fn: F) -> F:
        wrapper = _annotate(fn, "Inbound")
        spec = wrapper.vms_spec
        _not_pushed_down(spec, "Inbound")
        if spec.inbound is not None:
            raise AnnotationError(spec.qualname, "has two @Inbound annotations; use one per handler")
        events = _event_types(event, spec.qualname, "@Inbound's event")
        if len(events) != 1:
            raise AnnotationError(
                spec.qualname, "@Inbound takes one event type; write one handler per event type"
            )
        event_type = events[0]
        before = () if precedence is None else _event_types(precedence, spec.qualname, "precedence")
        if event_type in before:
            raise AnnotationError(spec.qualname, f"{event_type.__name__} cannot precede itself")
        if len(spec.params) < 1:
            raise AnnotationError(
                spec.qualname,
                f"an @Inbound handler takes the event as a parameter ({event_type.__name__})",
            )
        wrapper.vms_revise(
            inbound=InboundSpec(
                event_type,
                before,
                _check_attempts(max_attempts, spec.qualname, "max_attempts"),
                blocking,
                _check_attempts(group_commit, spec.qualname, "group_commit"),
            )
        )
        return cast(F, wrapper)

    return apply


def Outbound(events: type[Event] | Iterable[type[Event]]) -> Callable[[F], F]:
    """Declare the event types the function may ``send()`` (or return)."""
    _needs_argument(events, "Outbound", "MyEvent")

    def apply(fn: F) -> F:
        wrapper = _annotate(fn, "Outbound")
        spec = wrapper.vms_spec
        _not_pushed_down(spec, "Outbound")
        declared = _event_types(events, spec.qualname, "@Outbound's events")
        wrapper.vms_revise(outbound=tuple(dict.fromkeys(spec.outbound + declared)))
        return cast(F, wrapper)

    return apply


@overload
def Transactional(type: F) -> F: ...


@overload
def Transactional(
    type: str = "RW", isolation: str = "read_committed", *, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> Callable[[F], F]: ...


def Transactional(
    type: Any = "RW",
    isolation: str = "read_committed",
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Any:
    """Run the function in one transaction of its service.

    ``type``: ``"RW"`` or ``"RO"`` (read-only in Postgres). ``isolation``: ``"serializable"``,
    ``"snapshot"`` (REPEATABLE READ) or ``"read_committed"``. Serialization failures and
    deadlocks are retried up to ``max_attempts`` times in all, with jittered backoff.
    Usable bare (``@Transactional``) or with options.
    """
    if callable(type):  # bare @Transactional
        return Transactional()(type)

    def apply(fn: F) -> F:
        wrapper = _annotate(fn, "Transactional")
        spec = wrapper.vms_spec
        if spec.transactional is not None:
            raise AnnotationError(spec.qualname, "has two @Transactional annotations")
        if type not in TX_TYPES:
            raise AnnotationError(
                spec.qualname, f"@Transactional type must be one of {TX_TYPES}, got {type!r}"
            )
        if isolation not in ISOLATIONS:
            raise AnnotationError(
                spec.qualname,
                f"@Transactional isolation must be one of {ISOLATIONS}, got {isolation!r}",
            )
        _not_pushed_down(spec, "Transactional")
        wrapper.vms_revise(
            transactional=TransactionalSpec(
                type,
                isolation,  # type: ignore[arg-type]  # checked against ISOLATIONS just above
                _check_attempts(max_attempts, spec.qualname, "max_attempts"),
            )
        )
        return cast(F, wrapper)

    return apply


def _pushed_down(fn: Any, annotation: str, text: str) -> ServiceFunction:
    wrapper = _annotate(fn, annotation)
    spec = wrapper.vms_spec
    if not isinstance(text, str) or not text.strip():
        raise AnnotationError(spec.qualname, f'@{annotation} needs its text, e.g. @{annotation}("FROM ...")')
    if spec.lease is not None or spec.query is not None:
        raise AnnotationError(spec.qualname, "carries both @Lease and @Query (or one twice)")
    if spec.transactional is not None or spec.inbound is not None or spec.outbound:
        raise AnnotationError(
            spec.qualname,
            f"@{annotation} is an API function run by the core; it cannot also be "
            "@Transactional, @Inbound or @Outbound",
        )
    return wrapper


def Lease(text: str) -> Callable[[F], F]:
    """A reservation pushed down to the core; the function's body is ``...``.

    ``FROM <Entity> <alias> WHERE <key conditions> FOR UPDATE DECREMENT <alias>.<column>
    BY :qty WITH PERIOD :period``. The text is parsed here; it is checked against the service's
    tables at start-up.
    """
    _needs_argument(text, "Lease", '"FROM ..."')

    def apply(fn: F) -> F:
        wrapper = _pushed_down(fn, "Lease", text)
        spec = wrapper.vms_spec
        try:
            lease = parse_lease(text)
        except LanguageError as err:
            raise AnnotationError(spec.qualname, f"@Lease text does not parse: {err}") from err
        wrapper.vms_revise(lease=lease)
        return cast(F, wrapper)

    return apply


def Query(text: str) -> Callable[[F], F]:
    """A consistent cross-service read pushed down to the core; the function's body is ``...``.

    The text (FROM-first or SELECT) is parsed and resolved against the services' exports at
    start-up, when all descriptors are known.
    """
    _needs_argument(text, "Query", '"FROM ..."')

    def apply(fn: F) -> F:
        wrapper = _pushed_down(fn, "Query", text)
        wrapper.vms_revise(query=text)
        return cast(F, wrapper)

    return apply
