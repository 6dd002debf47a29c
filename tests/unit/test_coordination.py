"""Holistic coordination: the dataflow's warnings at start-up and in ``vmsdb services``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dbcore.descriptor import InboundDescriptor, OutboundDescriptor, ServiceDescriptor
from framework import Event, Inbound, Outbound, Service, Transactional
from framework._internal.coordination import Finding, coordination
from framework._internal.descriptors import build_plans
from framework.cli import cli


def service(
    name: str,
    inbound: tuple[tuple[str, str, tuple[str, ...]], ...] = (),
    outbound: tuple[tuple[str, tuple[str, ...]], ...] = (),
) -> ServiceDescriptor:
    return ServiceDescriptor(
        name=name,
        inbound=tuple(InboundDescriptor(event=e, handler=h, precedence=p) for e, h, p in inbound),
        outbound=tuple(OutboundDescriptor(function=f, events=es) for f, es in outbound),
    )


def kinds(findings: list[Finding]) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    return [(f.kind, f.events, f.services) for f in findings]


def test_a_closed_pipeline_has_nothing_to_report() -> None:
    cart = service("cart", outbound=(("checkout", ("Reserve",)),))  # a direct call starts it
    stock = service("stock", inbound=(("Reserve", "reserve", ()),))
    assert coordination([cart, stock]) == []


def test_events_nobody_handles_and_handlers_nobody_feeds_are_reported() -> None:
    cart = service("cart", inbound=(("AddItem", "add", ()),), outbound=(("add", ("Added",)),))
    findings = coordination([cart])
    assert kinds(findings) == [
        ("unconsumed", ("Added",), ("cart",)),
        ("unproduced", ("AddItem",), ("cart",)),
    ]
    assert "Added is emitted (cart.add) but no registered service handles it" in findings[0].message
    assert "cart.add handle(s) AddItem, which no registered service emits" in findings[1].message


def test_a_cycle_of_handlers_is_reported_once_with_its_chain() -> None:
    ping = service("ping", inbound=(("Pong", "on_pong", ()),), outbound=(("on_pong", ("Ping",)),))
    pong = service("pong", inbound=(("Ping", "on_ping", ()),), outbound=(("on_ping", ("Pong",)),))
    findings = [f for f in coordination([ping, pong]) if f.kind == "cycle"]
    assert kinds(findings) == [("cycle", ("Ping", "Pong"), ("ping", "pong"))]
    assert "ping.on_pong -[Ping] -> pong.on_ping -[Pong] -> ping.on_pong" in findings[0].message


def test_a_handler_emitting_what_it_handles_is_a_cycle() -> None:
    echo = service("echo", inbound=(("Tick", "tick", ()),), outbound=(("tick", ("Tick",)),))
    assert kinds([f for f in coordination([echo]) if f.kind == "cycle"]) == [("cycle", ("Tick",), ("echo",))]


def test_a_request_and_its_reply_through_direct_calls_is_no_cycle() -> None:
    # cart's direct call emits Reserve; stock answers Reserved, which cart handles without emitting
    cart = service("cart", inbound=(("Reserved", "on_reserved", ()),), outbound=(("checkout", ("Reserve",)),))
    stock = service("stock", inbound=(("Reserve", "reserve", ()),), outbound=(("reserve", ("Reserved",)),))
    assert coordination([cart, stock]) == []


def test_a_precedence_on_a_type_no_service_emits_is_reported() -> None:
    product = service("product", outbound=(("update", ("PriceUpdate",)),))
    cart = service(
        "cart",
        inbound=(
            ("PriceUpdate", "on_price", ("Checkout",)),  # PriceUpdate is emitted: fine
            ("Discount", "on_discount", ("Checkout",)),  # nobody emits Discount
            ("Checkout", "on_checkout", ()),
        ),
    )
    findings = [f for f in coordination([product, cart]) if f.kind == "precedence"]
    assert kinds(findings) == [("precedence", ("Discount", "Checkout"), ("cart",))]
    assert "no registered service emits Discount: it can never precede Checkout" in findings[0].message


# -- from annotated services: logged at start-up, listed by `vmsdb services` -------------------------


class Ping(Event, key="n"):
    n: int


class Pong(Event, key="n"):
    n: int


class Orphan(Event, key="n"):
    n: int


class Pinger(Service, name="pinger"):
    @Inbound(Pong)
    @Outbound(Ping)
    @Transactional
    async def on_pong(self, ev: Pong) -> Ping:
        return Ping(n=ev.n + 1)

    @Inbound(Orphan, precedence=Pong)
    @Transactional
    async def on_orphan(self, ev: Orphan) -> None: ...


class Ponger(Service, name="ponger"):
    @Inbound(Ping)
    @Outbound(Pong)
    @Transactional
    async def on_ping(self, ev: Ping) -> Pong:
        return Pong(n=ev.n + 1)


SERVICES = [Pinger, Ponger]


def test_start_up_logs_each_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vmsdb.dataflow"):
        build_plans(SERVICES)
    messages = [r.getMessage() for r in caplog.records if r.name == "vmsdb.dataflow"]
    assert len(messages) == 3, messages
    cycle = "cycle in the dataflow: pinger.on_pong -[Ping] -> ponger.on_ping"
    assert any(m.startswith(cycle) for m in messages)
    assert any("handle(s) Orphan, which no registered service emits" in m for m in messages)
    assert any("no registered service emits Orphan: it can never precede Pong" in m for m in messages)


def test_vmsdb_services_lists_the_warnings(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["services", "tests.unit.test_coordination:SERVICES", "--graph", str(tmp_path / "flow")]
    )
    assert result.exit_code == 0, result.output
    assert "Coordination warnings" in result.output
    for kind in ("cycle", "unproduced", "precedence"):
        assert kind in result.output
