"""Unit tests for start-up scanning: ``build_plans`` / ``build_descriptors`` (no database).

No ``from __future__ import annotations``: the services are defined inside functions, and a
dependency such as ``stock: Stock`` must be the class itself for ``typing.get_type_hints``.
"""

import dataclasses
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Integer, Numeric, String
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Mapped, mapped_column

from dbcore.core import Core
from dbcore.descriptor import (
    ColumnDescriptor,
    EventTypeDescriptor,
    InboundDescriptor,
    LeaseDescriptor,
    OutboundDescriptor,
    QueryDescriptor,
    ReferenceableDescriptor,
    ReferenceColumnDescriptor,
    ServiceDescriptor,
    TableDescriptor,
    TransactionalDescriptor,
)
from dbcore.errors import LanguageError
from framework import (
    AnnotationError,
    App,
    Event,
    Inbound,
    Lease,
    Outbound,
    Query,
    Ref,
    Service,
    ServiceCallError,
    Transactional,
    ref_column,
)
from framework._internal.annotations import FunctionSpec, TransactionalSpec, spec_of
from framework._internal.descriptors import build_descriptors, build_plans, function_specs
from framework._internal.host import Host
from framework._internal.leases import LeaseExecutor
from framework._internal.runtime import ServiceRuntime


class AddCartItemRequest(Event, key="customer_id"):
    customer_id: str
    item_id: str
    qty: int


class AddCartItemAttempt(Event, key="customer_id", name="cart.AddCartItemAttempt"):
    customer_id: str
    qty: int
    ok: bool


class CheckoutRequest(Event, key="customer_id"):
    customer_id: str


STOCK_LEASE = "FROM StockItem s WHERE s.id = :item_id FOR UPDATE DECREMENT s.qty BY :qty WITH PERIOD :period"
LOW_STOCK = "FROM StockItem s WHERE s.qty < :limit"
LEVELS = "SELECT s.id, s.qty FROM stock.StockItem s WHERE s.id IN (:items[id])"


def owning(service: type[Service], *models: type) -> type[Service]:
    """Keep ``models`` alive as long as ``service``: SQLAlchemy's registry holds mapped classes
    weakly, so a model defined in a function and not referenced would vanish from the descriptor."""
    service.models = models  # type: ignore[attr-defined]
    return service


def eshop(isolation: str = "serializable") -> list[type[Service]]:
    """DESIGN.md's example, freshly defined: Stock (exported model, lease), Cart, and Report."""

    class Stock(Service, name="stock"):
        @Lease(STOCK_LEASE)
        async def get_stock_item_info(self, item_id: str, qty: int, period: timedelta) -> None: ...

    @Stock.export
    class StockItem(Stock.Model):
        __tablename__ = "stock_items"
        id: Mapped[str] = mapped_column(String(40), primary_key=True)
        qty: Mapped[int]
        price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
        restocked_at: Mapped[datetime | None]

    class Cart(Service, name="cart"):
        stock: Stock

        @Inbound(AddCartItemRequest, precedence=CheckoutRequest, max_attempts=3)
        @Outbound(AddCartItemAttempt)
        @Transactional(type="RW", isolation=isolation)
        async def handle_add_cart_item(self, req: AddCartItemRequest) -> None: ...

        @Inbound(CheckoutRequest)
        async def checkout(self, req: CheckoutRequest) -> None: ...

        @Transactional(type="RO", isolation="snapshot")
        async def cart_total(self, customer_id: str) -> int: ...

    class CartItem(Cart.Model):
        __tablename__ = "cart_items"
        customer_id: Mapped[str] = mapped_column(primary_key=True)
        item_id: Mapped[str] = mapped_column(primary_key=True)
        qty: Mapped[int]

    class Report(Service, name="report"):
        @Query(LOW_STOCK)
        async def low_stock(self, limit: int) -> list[dict[str, Any]]: ...

        @Query(LEVELS)
        async def levels(self, items: list[Any]) -> list[dict[str, Any]]: ...

    return [owning(Stock, StockItem), owning(Cart, CartItem), Report]


def col(name: str, type_: str, *, pk: bool = False, nullable: bool = False) -> ColumnDescriptor:
    return ColumnDescriptor(name=name, type=type_, nullable=nullable, primary_key=pk)


def event(cls: type[Event]) -> EventTypeDescriptor:
    return EventTypeDescriptor(
        name=cls.event_type(), key=cls.__event_key__, json_schema=cls.model_json_schema()
    )


STOCK = ServiceDescriptor(
    name="stock",
    tables=(
        TableDescriptor(
            name="stock_items",
            entity="StockItem",
            columns=(
                col("id", "VARCHAR(40)", pk=True),
                col("qty", "INTEGER"),
                col("price", "NUMERIC(10, 2)"),
                col("restocked_at", "TIMESTAMP WITHOUT TIME ZONE", nullable=True),
            ),
            exported=True,
        ),
    ),
    leases=(
        LeaseDescriptor(
            function="get_stock_item_info", text=STOCK_LEASE, params=("item_id", "qty", "period")
        ),
    ),
)
CART = ServiceDescriptor(
    name="cart",
    tables=(
        TableDescriptor(
            name="cart_items",
            entity="CartItem",
            columns=(
                col("customer_id", "VARCHAR", pk=True),
                col("item_id", "VARCHAR", pk=True),
                col("qty", "INTEGER"),
            ),
            exported=False,
        ),
    ),
    events=(event(AddCartItemRequest), event(CheckoutRequest), event(AddCartItemAttempt)),
    inbound=(
        InboundDescriptor(event="CheckoutRequest", handler="checkout"),
        InboundDescriptor(
            event="AddCartItemRequest",
            handler="handle_add_cart_item",
            precedence=("CheckoutRequest",),
            max_attempts=3,
        ),
    ),
    outbound=(OutboundDescriptor(function="handle_add_cart_item", events=("cart.AddCartItemAttempt",)),),
    transactional=(
        TransactionalDescriptor(function="cart_total", type="RO", isolation="snapshot"),
        TransactionalDescriptor(function="checkout", type="RW", isolation="read_committed"),
        TransactionalDescriptor(function="handle_add_cart_item", type="RW", isolation="serializable"),
    ),
    dependencies=("stock",),
)
REPORT = ServiceDescriptor(
    name="report",
    queries=(
        QueryDescriptor(function="levels", text=LEVELS, params=("items",)),
        QueryDescriptor(function="low_stock", text=LOW_STOCK, params=("limit",)),
    ),
)


@pytest.fixture
def descriptors() -> list[ServiceDescriptor]:
    return build_descriptors(eshop())


def test_descriptors_exactly(descriptors: list[ServiceDescriptor]) -> None:
    assert [d.name for d in descriptors] == ["stock", "cart", "report"]
    assert descriptors == [STOCK, CART, REPORT]


def test_event_descriptor_carries_key_and_json_schema(descriptors: list[ServiceDescriptor]) -> None:
    checkout = next(e for e in descriptors[1].events if e.name == "CheckoutRequest")
    assert checkout.key == "customer_id"
    assert checkout.json_schema == {
        "title": "CheckoutRequest",
        "type": "object",
        "additionalProperties": False,
        "properties": {"customer_id": {"title": "Customer Id", "type": "string"}},
        "required": ["customer_id"],
    }
    assert descriptors[1].emitted_events == ("cart.AddCartItemAttempt",)


def test_plans_hold_functions_and_compiled_queries() -> None:
    stock, cart, report = build_plans(eshop())
    assert set(cart.functions) == {"handle_add_cart_item", "checkout", "cart_total"}
    assert set(cart.calls) == set(cart.functions)
    implied = cart.calls["checkout"]
    assert implied.spec.transactional is None
    assert implied.tx == TransactionalSpec("RW", "read_committed", 10, explicit=False)
    assert cart.calls["handle_add_cart_item"].allowed_events == frozenset({AddCartItemAttempt})
    assert stock.calls["get_stock_item_info"].tx is None
    assert report.calls["low_stock"].query is report.queries["low_stock"]
    assert (
        report.queries["low_stock"].sql == 'SELECT s.* FROM "stock"."stock_items" AS s WHERE s.qty < :limit'
    )
    assert report.queries["levels"].sql == (
        'SELECT s.id, s.qty FROM "stock"."stock_items" AS s WHERE s.id = ANY(:items__id)'
    )
    assert stock.queries == cart.queries == {}


def test_json_round_trip(descriptors: list[ServiceDescriptor]) -> None:
    for d in descriptors:
        assert ServiceDescriptor.from_json(d.to_json()) == d
        assert ServiceDescriptor.from_json(json.loads(json.dumps(d.to_json()))) == d


def fingerprints(classes: Sequence[type[Service]]) -> dict[str, str]:
    return {d.name: d.fingerprint() for d in build_descriptors(classes)}


def test_fingerprint_stable_across_builds_and_changes_with_an_annotation() -> None:
    first = fingerprints(eshop())
    assert fingerprints(eshop()) == first
    changed = fingerprints(eshop(isolation="snapshot"))
    assert changed["cart"] != first["cart"]
    assert {k: v for k, v in changed.items() if k != "cart"} == {
        k: v for k, v in first.items() if k != "cart"
    }


# --- start-up errors -------------------------------------------------------------------------


def plan_error(classes: Sequence[Any], *words: str) -> AnnotationError:
    """``build_plans(classes)`` must raise an AnnotationError whose message contains ``words``."""
    with pytest.raises(AnnotationError) as info:
        build_plans(classes)
    for word in words:
        assert word in str(info.value)
    return info.value


def test_two_classes_claiming_one_name() -> None:
    class Depot(Service, name="stock"): ...

    plan_error([*eshop(), Depot], "Depot", "claims the name 'stock'", "Stock")


def test_model_in_another_schema() -> None:
    class Depot(Service, name="depot"): ...

    class Stray(Depot.Model):
        __tablename__ = "strays"
        __table_args__ = {"schema": "other"}
        id: Mapped[int] = mapped_column(primary_key=True)

    plan_error([Depot], "model test_model_in_another_schema.<locals>.Stray", "'other'", "'depot'")


def test_dependency_not_in_the_app() -> None:
    _stock, cart, report = eshop()
    plan_error([cart, report], "service eshop.<locals>.Cart", "depends on service 'stock'")


def test_precedence_on_an_event_the_service_does_not_handle() -> None:
    class Depot(Service, name="depot"):
        @Inbound(AddCartItemRequest, precedence=CheckoutRequest)
        async def handle(self, req: AddCartItemRequest) -> None: ...

    plan_error(
        [Depot], "Depot.handle", "precedence=CheckoutRequest", "no @Inbound handler for CheckoutRequest"
    )


def test_two_handlers_for_one_event() -> None:
    class Depot(Service, name="depot"):
        @Inbound(CheckoutRequest)
        async def first(self, req: CheckoutRequest) -> None: ...

        @Inbound(CheckoutRequest)
        async def second(self, req: CheckoutRequest) -> None: ...

    plan_error([Depot], "Depot.second", "already handles CheckoutRequest in", "Depot.first")


def leasing(text: str) -> type[Service]:
    class Depot(Service, name="depot"):
        @Lease(text)
        async def reserve(self, item_id: str, qty: int, period: timedelta) -> None: ...

    class Bin(Depot.Model):
        __tablename__ = "bins"
        id: Mapped[str] = mapped_column(primary_key=True)
        qty: Mapped[int]
        label: Mapped[str]

    return owning(Depot, Bin)


def querying(text: str) -> type[Service]:
    class Audit(Service, name="audit"):
        @Query(text)
        async def run(self, limit: int) -> list[dict[str, Any]]: ...

    return Audit


@pytest.mark.parametrize(
    ("make", "text", "problem"),
    [
        pytest.param(
            leasing, STOCK_LEASE, "entity 'StockItem' is not a table of this service", id="lease-foreign"
        ),
        pytest.param(
            leasing,
            "FROM Bin b WHERE b.id = :item_id FOR UPDATE DECREMENT b.label BY :qty WITH PERIOD :period",
            "cannot DECREMENT column 'label' of type VARCHAR: it must be numeric",
            id="lease-not-numeric",
        ),
        pytest.param(
            leasing,
            "FROM Bin b WHERE b.id = :item_id FOR UPDATE DECREMENT b.qty BY :qty WITH PERIOD :ttl",
            "parameter :ttl is not a parameter of the function",
            id="lease-unknown-param",
        ),
        pytest.param(
            querying,
            "FROM CartItem c WHERE c.qty > :limit",
            "entity 'CartItem' of service 'cart' is not exported",
            id="query-unexported",
        ),
        pytest.param(
            querying, "FROM StockItem s WHERE s.qty < :max", "unknown parameter at ':max'", id="query-param"
        ),
        pytest.param(
            querying,
            "DELETE FROM StockItem WHERE qty < :limit",
            "only read queries are allowed",
            id="query-write",
        ),
        pytest.param(
            querying,
            "SELECT * FROM StockItem FOR UPDATE",
            "only read queries are allowed",
            id="query-locking-read",
        ),
    ],
)
def test_pushed_down_text_checked_against_the_app(
    make: Callable[[str], type[Service]], text: str, problem: str
) -> None:
    service = make(text)
    function = "leasing.<locals>.Depot.reserve" if make is leasing else "querying.<locals>.Audit.run"
    err = plan_error([*eshop(), service], problem)
    assert err.function == function
    assert isinstance(err.__cause__, LanguageError)


class NotAService:
    pass


@pytest.mark.parametrize(
    "item",
    [Service, NotAService, "cart", Event, AddCartItemRequest],
    ids=["Service", "plain class", "str", "Event", "an Event"],
)
def test_something_that_is_not_a_service_class(item: Any) -> None:
    err = plan_error([*eshop(), item], "is not a Service subclass", repr(item))
    assert err.function == "App"


def test_a_service_instance_is_not_a_service_class() -> None:
    stock, *_ = eshop()
    plan_error([stock()], "is not a Service subclass")


def test_a_nested_list_is_not_a_service_class() -> None:
    plan_error([eshop()], "is not a Service subclass")


def test_migrations_render_reference_columns_as_plain_jsonb() -> None:
    """A generated revision must load as written: it cannot name the framework's column type."""
    from types import SimpleNamespace

    from framework._internal.migrations import render_item
    from framework.references import RefType

    context = SimpleNamespace(imports=set())
    assert render_item("type", RefType(), context) == "postgresql.JSONB(astext_type=sa.Text())"
    assert context.imports == {"from sqlalchemy.dialects import postgresql"}
    assert render_item("type", Integer(), context) is False


# -- references (G9) are part of the descriptor ---------------------------------------------------


def referencing(*, referenceable: bool = True) -> list[type[Service]]:
    """Crm gives references to its customers (a two-column key); Shop's orders hold them."""

    class Crm(Service, name="crm"):
        pass

    class Customer(Crm.Model):
        __tablename__ = "customers"
        region: Mapped[str] = mapped_column(primary_key=True)
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    if referenceable:
        Crm.referenceable(Customer)

    class Shop(Service, name="shop"):
        pass

    class Order(Shop.Model):
        __tablename__ = "orders"
        id: Mapped[str] = mapped_column(primary_key=True)
        customer: Mapped[Ref | None] = ref_column(Customer)
        buyer: Mapped[Ref | None] = ref_column(Customer)

    return [owning(Crm, Customer), owning(Shop, Order)]


def test_references_are_part_of_the_descriptor() -> None:
    crm, shop = build_descriptors(referencing())
    assert crm.referenceable == (
        ReferenceableDescriptor(table="customers", entity="Customer", key=("region", "id")),
    )
    assert crm.reference_columns == ()
    assert shop.referenceable == ()
    to_customers = {"target_service": "crm", "target_table": "customers"}
    assert shop.reference_columns == (
        ReferenceColumnDescriptor(table="orders", column="customer", **to_customers),
        ReferenceColumnDescriptor(table="orders", column="buyer", **to_customers),
    )
    assert crm.declares_references and shop.declares_references
    assert not any(d.declares_references for d in build_descriptors(eshop()))


def test_references_survive_the_json_round_trip() -> None:
    crm, shop = (json.loads(json.dumps(d.to_json())) for d in build_descriptors(referencing()))
    assert [ServiceDescriptor.from_json(d) for d in (crm, shop)] == build_descriptors(referencing())
    assert crm["referenceable"] == [{"table": "customers", "entity": "Customer", "key": ["region", "id"]}]
    assert shop["reference_columns"][0] == {
        "table": "orders",
        "column": "customer",
        "target_service": "crm",
        "target_table": "customers",
    }


def test_making_a_model_referenceable_is_a_new_descriptor_version() -> None:
    (plain,) = build_descriptors(referencing(referenceable=False)[:1])
    (marked,) = build_descriptors(referencing()[:1])
    assert plain.tables == marked.tables
    assert plain.fingerprint() != marked.fingerprint()


def test_a_reference_to_a_model_that_is_not_referenceable() -> None:
    err = plan_error(referencing(referenceable=False), "Customer is not @referenceable")
    assert err.function.endswith("Order.customer")


# -- call plans: built per App, nothing written onto the annotations ------------------------------


def spec_state(spec: FunctionSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def test_function_specs_are_immutable() -> None:
    _, cart, _ = eshop()
    spec = spec_of(cart.checkout)
    assert spec is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.outbound = (AddCartItemAttempt,)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tx = None  # type: ignore[attr-defined]


def test_two_apps_of_one_service_class_share_no_per_function_state() -> None:
    classes = eshop()
    specs = {(cls, attr): spec for cls in classes for attr, spec in function_specs(cls).items()}
    before = {key: spec_state(spec) for key, spec in specs.items()}
    first = App(classes, worker_concurrency=2)
    second = App(classes[:2], worker_concurrency=16, pool_size=3)
    assert first.settings.worker_concurrency != second.settings.worker_concurrency
    for one, other in zip(first.plans, second.plans, strict=False):
        assert one.cls is other.cls
        for attr, call in one.calls.items():
            twin = other.calls[attr]
            assert call is not twin  # each App has its own plan
            assert call.spec is twin.spec is specs[(one.cls, attr)]  # of the one annotation
            assert (call.tx, call.allowed_events) == (twin.tx, twin.allowed_events)
    # Building the plans wrote nothing onto the annotations' specs.
    assert {key: spec_state(spec) for key, spec in specs.items()} == before
    assert all(not hasattr(spec, "allowed_events") for spec in specs.values())


def test_a_call_without_a_plan_is_refused_not_run_without_its_transaction() -> None:
    """An annotated function the App did not plan (here: on a mixin that is not a Service) must
    not run as if it had no annotation."""

    class Audited:
        @Transactional
        async def audit(self) -> None: ...

    class Ledger(Audited, Service, name="ledger"):
        pass

    app = App([Ledger])
    (plan,) = app.plans
    assert "audit" not in plan.calls
    # A core that is never connected: the call is refused before anything reaches it.
    host = Host(Core(create_async_engine("postgresql+asyncpg://nobody@/nowhere")), app.settings, app.plans)
    runtime = ServiceRuntime(host, plan, LeaseExecutor(host))
    with pytest.raises(ServiceCallError, match=r"Audited\.audit is not one of the annotated functions"):
        runtime.instance.audit()
