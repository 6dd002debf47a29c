"""Unit tests for the annotations: stacking, introspection under FastAPI, import-time errors, events.

No ``from __future__ import annotations`` here on purpose: the services below are defined inside
functions, and their annotations must be real objects for FastAPI and for the comparisons.
"""

import inspect
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Mapped, mapped_column

from framework import (
    AnnotationError,
    Event,
    FrameworkError,
    Inbound,
    Lease,
    NoTransactionError,
    Outbound,
    Query,
    Service,
    ServiceCallError,
    Transactional,
    send,
    session,
)
from framework._internal.annotations import InboundSpec, ServiceFunction, TransactionalSpec, spec_of


class Placed(Event, key="order_id"):
    order_id: str
    qty: int


class Shipped(Event, name="order.shipped"):
    order_id: str


class NotAnEvent(BaseModel):
    order_id: str


LEASE = "FROM Item i WHERE i.id = :item_id FOR UPDATE DECREMENT i.qty BY :qty WITH PERIOD :period"

#: The three stacked annotations of DESIGN.md's handler, by name; fresh decorators on each call.
TRIO: dict[str, Callable[[], Callable[[Any], Any]]] = {
    "Inbound": lambda: Inbound(Placed),
    "Outbound": lambda: Outbound(Shipped),
    "Transactional": lambda: Transactional(type="RW", isolation="serializable"),
}


def stack(fn: Any, order: tuple[str, ...]) -> Any:
    """Annotate ``fn`` as if ``order`` were written top to bottom above it."""
    for name in reversed(order):
        fn = TRIO[name]()(fn)
    return fn


def orders_service(order: tuple[str, ...]) -> type[Service]:
    class Orders(Service, name="orders"):
        async def handle(self, ev: Placed, note: str = "") -> Shipped | None:
            """Ship a placed order."""

        handle = stack(handle, order)

    return Orders


@pytest.fixture(params=list(itertools.permutations(TRIO)), ids="-".join)
def orders(request: pytest.FixtureRequest) -> type[Service]:
    """The Orders service with its handler's three annotations stacked in one of the six orders."""
    return orders_service(request.param)


class Shop(Service, name="shop"):
    @Outbound(Shipped)
    @Transactional(type="RW", isolation="serializable")
    async def ship(self, k: str, n: int) -> dict[str, int]:
        """Ship ``n`` of item ``k``."""
        return {k: n}


@Transactional(type="RO", isolation="snapshot")
async def lookup(k: str, n: int = 1) -> dict[str, int]:
    """A module-level annotated function (a route may be stacked on it)."""
    return {k: n}


class Raw:
    """Plain functions the error tests annotate; their qualnames start with ``Raw.``."""

    async def handle(self, ev: Placed) -> None: ...

    async def no_event(self) -> None: ...

    def sync(self, ev: Placed) -> None: ...


def annotation_error(build: Callable[[], object], *words: str) -> AnnotationError:
    """Run ``build``, which must raise an AnnotationError whose message contains ``words``."""
    with pytest.raises(AnnotationError) as info:
        build()
    err = info.value
    assert isinstance(err, TypeError)
    assert isinstance(err, FrameworkError)
    for word in words:
        assert word in str(err)
    return err


# --- stacking and introspection --------------------------------------------------------------


def test_stacking_makes_one_wrapper_with_one_spec(orders: type[Service]) -> None:
    stored = vars(orders)["handle"]
    assert type(stored) is ServiceFunction
    assert inspect.isfunction(stored.__wrapped__)  # the user's function, not a second wrapper
    spec = spec_of(stored)
    assert spec is not None
    assert spec_of(orders.handle) is spec
    assert spec_of(orders().handle) is spec
    assert spec.function is stored.__wrapped__
    assert spec.qualname == "orders_service.<locals>.Orders.handle"
    assert spec.inbound == InboundSpec(Placed, (), 5)
    assert spec.outbound == (Shipped,)
    assert spec.transactional == TransactionalSpec("RW", "serializable", 10)
    assert spec.params == ("ev", "note")


@pytest.mark.parametrize("bound", [False, True], ids=["class", "instance"])
def test_stacking_keeps_introspection(orders: type[Service], bound: bool) -> None:
    fn = orders().handle if bound else orders.handle
    assert inspect.iscoroutinefunction(fn)
    assert fn.__name__ == "handle"
    assert fn.__qualname__ == "orders_service.<locals>.Orders.handle"
    assert fn.__doc__ == "Ship a placed order."
    sig = inspect.signature(fn)
    expected = ["ev", "note"] if bound else ["self", "ev", "note"]
    assert list(sig.parameters) == expected
    assert sig.parameters["ev"].annotation is Placed
    assert sig.parameters["note"].annotation is str
    assert sig.parameters["note"].default == ""
    assert sig.return_annotation == Shipped | None


def _openapi_operation(endpoint: Callable[..., Any], path: str) -> dict[str, Any]:
    app = FastAPI()
    app.add_api_route(path, endpoint, methods=["POST"])
    operation: dict[str, Any] = app.openapi()["paths"][path]["post"]
    return operation


def _parameters(operation: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(p["name"], p["in"], p["schema"]["type"]) for p in operation.get("parameters", [])]


@pytest.mark.parametrize("make", [Shop, lambda: object.__new__(Shop)], ids=["Shop()", "object.__new__"])
def test_fastapi_sees_the_users_signature(make: Callable[[], Shop]) -> None:
    operation = _openapi_operation(make().ship, "/x/{k}")
    assert _parameters(operation) == [("k", "path", "string"), ("n", "query", "integer")]
    assert "requestBody" not in operation
    assert operation["operationId"] == "ship_x__k__post"
    assert operation["summary"] == "Ship"


def test_fastapi_sees_the_event_body_in_every_stacking_order(orders: type[Service]) -> None:
    operation = _openapi_operation(orders().handle, "/orders/{note}")
    assert _parameters(operation) == [("note", "path", "string")]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Placed"}


def test_route_decorator_stacked_on_an_annotated_function() -> None:
    router = APIRouter()
    decorated = router.post("/items/{k}")(lookup)
    assert decorated is lookup
    assert spec_of(decorated) is not None
    route = router.routes[0]
    assert route.endpoint is lookup
    assert route.name == "lookup"
    dependant = route.dependant
    assert [(p.name, p.field_info.annotation) for p in dependant.path_params] == [("k", str)]
    assert [(p.name, p.field_info.annotation, p.field_info.default) for p in dependant.query_params] == [
        ("n", int, 1)
    ]
    assert dependant.body_params == []


@pytest.mark.parametrize(
    "call",
    [
        lambda: Shop().ship("k", 1),
        lambda: object.__new__(Shop).ship("k", 1),
        lambda: lookup("k"),
    ],
    ids=["Shop()", "object.__new__", "module-level"],
)
async def test_calling_outside_an_app_raises_service_call_error(call: Callable[[], Any]) -> None:
    pending = call()
    assert inspect.isawaitable(pending)
    with pytest.raises(ServiceCallError, match="not attached to a running App"):
        await pending


# --- import-time errors ----------------------------------------------------------------------

EVERY_ANNOTATION = {
    "Inbound": lambda: Inbound(Placed),
    "Outbound": lambda: Outbound(Shipped),
    "Transactional": lambda: Transactional(type="RO"),
    "bare Transactional": lambda: Transactional,
    "Lease": lambda: Lease(LEASE),
    "Query": lambda: Query("SELECT 1"),
}


@pytest.mark.parametrize("annotation", EVERY_ANNOTATION)
def test_sync_function_rejected_by_every_annotation(annotation: str) -> None:
    decorate = EVERY_ANNOTATION[annotation]()
    err = annotation_error(lambda: decorate(Raw.sync), "async def", f"@{annotation.split()[-1]}")
    assert err.function == "Raw.sync"


@pytest.mark.parametrize("wrap", [staticmethod, classmethod])
def test_static_and_class_methods_rejected(wrap: Callable[[Any], Any]) -> None:
    annotation_error(lambda: Transactional()(wrap(Raw.handle)), "Raw.handle", "async method")


def _lease(fn: Any) -> Any:
    return Lease(LEASE)(fn)


def _transactional(fn: Any) -> Any:
    return Transactional()(fn)


def _query(fn: Any) -> Any:
    return Query("SELECT 1")(fn)


def _inbound(fn: Any) -> Any:
    return Inbound(Placed)(fn)


def _outbound(fn: Any) -> Any:
    return Outbound(Shipped)(fn)


MISUSES = [
    pytest.param(
        lambda: Transactional(isolation="repeatable_read")(Raw.handle),
        ("isolation", "'repeatable_read'"),
        id="unknown-isolation",
    ),
    pytest.param(
        lambda: Transactional(isolation="SERIALIZABLE")(Raw.handle),
        ("isolation", "'SERIALIZABLE'"),
        id="isolation-is-case-sensitive",
    ),
    pytest.param(lambda: Transactional(type="WO")(Raw.handle), ("type", "'WO'"), id="unknown-tx-type"),
    pytest.param(lambda: Transactional(type="rw")(Raw.handle), ("type", "'rw'"), id="lower-case-tx-type"),
    pytest.param(
        lambda: Transactional(max_attempts=0)(Raw.handle), ("max_attempts", "got 0"), id="tx-max-attempts-0"
    ),
    pytest.param(
        lambda: Transactional()(Transactional()(Raw.handle)), ("two @Transactional",), id="two-transactional"
    ),
    pytest.param(
        lambda: Inbound(NotAnEvent)(Raw.handle), ("Event subclass", "NotAnEvent"), id="inbound-basemodel"
    ),
    pytest.param(lambda: Inbound("Placed")(Raw.handle), ("Event subclass", "'Placed'"), id="inbound-str"),
    pytest.param(
        lambda: Inbound(Event)(Raw.handle),
        ("Event subclass", "got <class 'framework._internal.events.Event'>"),
        id="inbound-Event",
    ),
    pytest.param(lambda: Inbound([])(Raw.handle), ("names no event type",), id="inbound-empty-list"),
    pytest.param(
        lambda: Inbound(Placed, precedence=NotAnEvent)(Raw.handle),
        ("precedence", "NotAnEvent"),
        id="precedence-not-an-event",
    ),
    pytest.param(
        lambda: Inbound(Placed, precedence=Placed)(Raw.handle),
        ("Placed cannot precede itself",),
        id="precedence-on-itself",
    ),
    pytest.param(lambda: Outbound([])(Raw.handle), ("names no event type",), id="outbound-empty-list"),
    pytest.param(lambda: Outbound(NotAnEvent)(Raw.handle), ("NotAnEvent",), id="outbound-basemodel"),
    pytest.param(lambda: Inbound(Placed)(Inbound(Shipped)(Raw.handle)), ("two @Inbound",), id="two-inbound"),
    pytest.param(
        lambda: Inbound(Placed)(Raw.no_event),
        ("Raw.no_event", "takes the event as a parameter", "Placed"),
        id="inbound-without-event-parameter",
    ),
    pytest.param(
        lambda: Inbound(Placed, max_attempts=0)(Raw.handle),
        ("max_attempts", "got 0"),
        id="inbound-max-attempts-0",
    ),
    pytest.param(
        lambda: Inbound(Placed, max_attempts=True)(Raw.handle),
        ("max_attempts", "got True"),
        id="inbound-max-attempts-bool",
    ),
    pytest.param(
        lambda: Lease(LEASE.replace("FOR UPDATE", "FOR DELETE"))(Raw.handle),
        ("does not parse", "'DELETE'"),
        id="lease-does-not-parse",
    ),
    pytest.param(
        lambda: Lease(LEASE.replace(" = ", " < ", 1))(Raw.handle),
        ("does not parse", "'<'"),
        id="lease-condition-not-equals",
    ),
    pytest.param(lambda: _transactional(_lease(Raw.handle)), ("cannot also be",), id="lease-then-tx"),
    pytest.param(lambda: _lease(_transactional(Raw.handle)), ("cannot also be",), id="tx-then-lease"),
    pytest.param(lambda: _lease(_inbound(Raw.handle)), ("cannot also be",), id="inbound-then-lease"),
    pytest.param(lambda: _query(_lease(Raw.handle)), ("both @Lease and @Query",), id="lease-then-query"),
    pytest.param(lambda: _lease(_query(Raw.handle)), ("both @Lease and @Query",), id="query-then-lease"),
    pytest.param(lambda: Query("")(Raw.handle), ("@Query needs its text",), id="query-empty"),
    pytest.param(lambda: Query("   ")(Raw.handle), ("@Query needs its text",), id="query-blank"),
    pytest.param(lambda: Lease("")(Raw.handle), ("@Lease needs its text",), id="lease-empty"),
]


@pytest.mark.parametrize(("build", "words"), MISUSES)
def test_misuse_is_an_annotation_error_naming_function_and_problem(
    build: Callable[[], object], words: tuple[str, ...]
) -> None:
    err = annotation_error(build, *words)
    assert err.function.startswith("Raw.")
    assert str(err).startswith(f"{err.function}: ")


@pytest.mark.parametrize("outer", [_inbound, _outbound], ids=["Inbound", "Outbound"])
@pytest.mark.parametrize("inner", [_lease, _query], ids=["Lease", "Query"])
def test_event_annotation_above_pushed_down_function_rejected(
    outer: Callable[[Any], Any], inner: Callable[[Any], Any]
) -> None:
    annotation_error(lambda: outer(inner(Raw.handle)), "Raw.handle")


def test_inbound_with_several_events_rejected() -> None:
    annotation_error(lambda: Inbound([Placed, Shipped])(Raw.handle), "Raw.handle")


@pytest.mark.parametrize("annotation", [Inbound, Outbound, Lease, Query], ids=lambda a: a.__name__)
def test_bare_annotation_without_arguments_rejected(annotation: Callable[[Any], Any]) -> None:
    annotation_error(lambda: annotation(Raw.handle), "Raw.handle")


def test_event_key_must_be_a_field() -> None:
    def define() -> None:
        class Bad(Event, key="customer"):
            order_id: str

    annotation_error(define, "event Bad", "key='customer'", "order_id")


def service_named(name: str) -> Callable[[], type[Service]]:
    def define() -> type[Service]:
        class Bad(Service, name=name): ...

        return Bad

    return define


@pytest.mark.parametrize("name", ["Bad-Name", "1st", "x" * 41])
def test_invalid_service_name(name: str) -> None:
    err = annotation_error(service_named(name), repr(name), "Postgres schema")
    assert err.function == "service service_named.<locals>.define.<locals>.Bad"


@pytest.mark.parametrize("name", ["vms", "pg_x", "public"])
def test_reserved_service_name_message_says_reserved(name: str) -> None:
    err = annotation_error(service_named(name), repr(name))
    assert "reserved" in err.problem


def test_export_of_another_services_model() -> None:
    class Owner(Service, name="owner"): ...

    class Other(Service, name="other"): ...

    class Thing(Owner.Model):
        __tablename__ = "things"
        id: Mapped[int] = mapped_column(primary_key=True)

    annotation_error(lambda: Other.export(Thing), "@Other.export", "Thing", "'other'")
    annotation_error(lambda: Other.export(NotAnEvent), "@Other.export", "NotAnEvent")
    assert Owner.export(Thing) is Thing


# --- send() and session() --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "what"),
    [(lambda: send(Shipped(order_id="o1")), "send()"), (session, "session()")],
    ids=["send", "session"],
)
def test_outside_a_transaction(call: Callable[[], object], what: str) -> None:
    with pytest.raises(NoTransactionError, match=r"only available inside a @Transactional") as info:
        call()
    assert str(info.value).startswith(what)
    assert isinstance(info.value, RuntimeError)


# --- events ----------------------------------------------------------------------------------


def test_event_type_defaults_to_class_name_and_name_overrides() -> None:
    assert Placed.__event_type__ == Placed.event_type() == "Placed"
    assert Shipped.__event_type__ == Shipped.event_type() == "order.shipped"

    class Express(Placed): ...

    assert Express.event_type() == "Express"
    assert Express.__event_key__ == "order_id"


def test_partition_key() -> None:
    assert Placed(order_id="o1", qty=2).partition_key() == "o1"
    assert Shipped(order_id="o1").partition_key() is None

    class ByQty(Event, key="qty"):
        qty: int

    assert ByQty(qty=7).partition_key() == "7"


def test_events_are_frozen_and_strict() -> None:
    event = Placed(order_id="o1", qty=2)
    with pytest.raises(ValidationError):
        event.qty = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Placed(order_id="o1", qty=2, extra="x")  # type: ignore[call-arg]
    assert event == Placed(order_id="o1", qty=2)
    assert hash(event) == hash(Placed(order_id="o1", qty=2))
