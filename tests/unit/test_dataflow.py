"""Unit tests for framework._internal.dataflow: flows, rich tables, DOT output and write_graph."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from dbcore.descriptor import (
    ColumnDescriptor,
    InboundDescriptor,
    LeaseDescriptor,
    OutboundDescriptor,
    QueryDescriptor,
    ReferenceableDescriptor,
    ReferenceColumnDescriptor,
    ServiceDescriptor,
    TableDescriptor,
)
from framework._internal.dataflow import (
    OUTSIDE,
    Flow,
    dataflow,
    flow_table,
    services_table,
    to_dot,
    write_graph,
)


def _chain() -> list[ServiceDescriptor]:
    key = (ColumnDescriptor(name="id", type="integer", primary_key=True),)
    cart = ServiceDescriptor(
        name="cart",
        tables=(TableDescriptor(name="cart_items", entity="CartItem", columns=key),),
        inbound=(
            InboundDescriptor(event="AddCartItem", handler="add_item"),
            InboundDescriptor(event="PriceUpdated", handler="on_price", precedence=("Checkout",)),
        ),
        outbound=(OutboundDescriptor(function="checkout", events=("ReserveStock",)),),
        queries=(QueryDescriptor(function="stock_of", text="SELECT 1", params=("sku",)),),
        dependencies=("stock",),
    )
    stock = ServiceDescriptor(
        name="stock",
        tables=(TableDescriptor(name="items", entity="StockItem", columns=key, exported=True),),
        inbound=(InboundDescriptor(event="ReserveStock", handler="reserve"),),
        outbound=(OutboundDescriptor(function="reserve", events=("StockConfirmed",)),),
        leases=(LeaseDescriptor(function="hold", text="SELECT 1", params=("sku", "qty")),),
    )
    order = ServiceDescriptor(
        name="order",
        inbound=(InboundDescriptor(event="StockConfirmed", handler="confirm"),),
        outbound=(OutboundDescriptor(function="confirm", events=("InvoiceIssued",)),),
    )
    return [cart, stock, order]


def _render(table: Table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_chain_flows_exactly() -> None:
    assert dataflow(_chain()) == [
        Flow("AddCartItem", OUTSIDE, (), "cart", "add_item", ()),
        Flow("PriceUpdated", OUTSIDE, (), "cart", "on_price", ("Checkout",)),
        Flow("ReserveStock", "cart", ("checkout",), "stock", "reserve", ()),
        Flow("InvoiceIssued", "order", ("confirm",), OUTSIDE, None, ()),
        Flow("StockConfirmed", "stock", ("reserve",), "order", "confirm", ()),
    ]


def test_flow_order_does_not_depend_on_descriptor_order() -> None:
    assert dataflow(list(reversed(_chain()))) == dataflow(_chain())


def test_one_flow_per_producer_consumer_pair() -> None:
    a = ServiceDescriptor(
        name="a",
        outbound=(
            OutboundDescriptor(function="f", events=("E",)),
            OutboundDescriptor(function="g", events=("E", "E")),
        ),
    )
    b = ServiceDescriptor(name="b", outbound=(OutboundDescriptor(function="h", events=("E",)),))
    c = ServiceDescriptor(name="c", inbound=(InboundDescriptor(event="E", handler="on_e"),))
    d = ServiceDescriptor(name="d", inbound=(InboundDescriptor(event="E", handler="on_e2"),))
    assert dataflow([a, b, c, d]) == [
        Flow("E", "a", ("f", "g"), "c", "on_e", ()),
        Flow("E", "a", ("f", "g"), "d", "on_e2", ()),
        Flow("E", "b", ("h",), "c", "on_e", ()),
        Flow("E", "b", ("h",), "d", "on_e2", ()),
    ]


def test_no_services_no_flows() -> None:
    assert dataflow([]) == []
    assert "->" not in to_dot([])


def test_services_table_renders() -> None:
    text = _render(services_table(_chain()))
    for expected in (
        "cart",
        "vms_cart",
        "cart_items (CartItem)",
        "items (StockItem) [exported]",
        "AddCartItem → add_item",
        "PriceUpdated → on_price (after Checkout)",
        "checkout: ReserveStock",
        "hold(sku, qty)",
        "stock_of(sku)",
        "vms_order",
    ):
        assert expected in text, expected
    assert "cart_items (CartItem) [exported]" not in text


def test_flow_table_renders_one_row_per_flow() -> None:
    text = _render(flow_table(_chain()))
    rows = [line for line in text.splitlines() if line.count("→") == 2]
    assert len(rows) == 5
    expected = [
        (OUTSIDE, "AddCartItem", "cart.add_item"),
        (OUTSIDE, "PriceUpdated", "cart.on_price"),
        ("cart.checkout", "ReserveStock", "stock.reserve"),
        ("order.confirm", "InvoiceIssued", OUTSIDE),
        ("stock.reserve", "StockConfirmed", "order.confirm"),
    ]
    cells = [[cell.strip() for cell in row.split("│")[1:-1]] for row in rows]
    assert [(c[0], c[2], c[4]) for c in cells] == expected
    assert [c[5] for c in cells] == ["", "Checkout", "", "", ""]


def test_dot_contains_each_edge() -> None:
    dot = to_dot(_chain())
    assert dot.startswith("digraph ")
    assert dot.rstrip().endswith("}")
    for name in ("cart", "stock", "order"):
        assert f'"{name}" [label="{name}\\n' in dot
    assert f'"{OUTSIDE}" [shape=ellipse' in dot
    edges = re.findall(r'^\s*("[^"]*") -> ("[^"]*") \[label="([^"]*)"(.*)\];$', dot, re.M)
    assert sorted((p, c, label.split("\\n")[0]) for p, c, label, _ in edges) == sorted(
        [
            (f'"{OUTSIDE}"', '"cart"', "AddCartItem"),
            (f'"{OUTSIDE}"', '"cart"', "PriceUpdated"),
            ('"cart"', '"stock"', "ReserveStock"),
            ('"stock"', '"order"', "StockConfirmed"),
            ('"order"', f'"{OUTSIDE}"', "InvoiceIssued"),
        ]
    )
    (price,) = [e for e in edges if e[2].startswith("PriceUpdated")]
    assert "on_price (after Checkout)" in price[2]
    assert "dashed" in price[3]


def test_dot_one_edge_per_producer_consumer_event() -> None:
    a = ServiceDescriptor(name="a", outbound=(OutboundDescriptor(function="f", events=("E",)),))
    b = ServiceDescriptor(
        name="b",
        inbound=(
            InboundDescriptor(event="E", handler="one"),
            InboundDescriptor(event="E", handler="two"),
        ),
    )
    dot = to_dot([a, b])
    assert dot.count('"a" -> "b"') == 1
    assert '"a" -> "b" [label="E\\n→ one\\n→ two"];' in dot
    assert OUTSIDE not in dot


def _weird() -> list[ServiceDescriptor]:
    return [
        ServiceDescriptor(
            name="shop",
            outbound=(OutboundDescriptor(function="emit", events=('Say "hi" now', "back\\slash")),),
        ),
        ServiceDescriptor(
            name="sink",
            inbound=(InboundDescriptor(event='Say "hi" now', handler="on hi\nthere"),),
        ),
    ]


def test_dot_quotes_and_escapes_names() -> None:
    dot = to_dot(_weird())
    assert '"shop" -> "sink" [label="Say \\"hi\\" now\\n→ on hi\\nthere"];' in dot
    assert f'"shop" -> "{OUTSIDE}" [label="back\\\\slash"];' in dot
    # Every quoted string is well formed: strip escapes and check quotes pair up on each line.
    for line in dot.splitlines():
        assert re.sub(r"\\.", "", line).count('"') % 2 == 0, line


def test_write_graph_without_dot_writes_only_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    stem = tmp_path / "out" / "services.v1"
    assert write_graph(_chain(), stem) == [tmp_path / "out" / "services.v1.dot"]
    assert (tmp_path / "out" / "services.v1.dot").read_text(encoding="utf-8") == to_dot(_chain())
    assert not (tmp_path / "out" / "services.v1.svg").exists()


def test_write_graph_failing_dot_raises_with_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    fake.write_text("#!/bin/sh\necho 'syntax error in line 3' >&2\nexit 2\n", encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(RuntimeError, match=r"(?s)exit code 2.*syntax error in line 3"):
        write_graph(_chain(), tmp_path / "graph")
    assert (tmp_path / "graph.dot").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_write_graph_with_graphviz_writes_svg(tmp_path: Path) -> None:
    paths = write_graph(_chain(), tmp_path / "graph")
    assert paths == [tmp_path / "graph.dot", tmp_path / "graph.svg"]
    svg = (tmp_path / "graph.svg").read_text(encoding="utf-8")
    assert "<svg" in svg
    assert "StockConfirmed" in svg
    # Graphviz accepts the escaped names too.
    weird = write_graph(_weird(), tmp_path / "weird")
    svg = weird[1].read_text(encoding="utf-8")
    assert "Say &quot;hi&quot; now" in svg
    assert "back\\slash" in svg


def test_services_table_shows_what_each_service_gives_and_holds_in_references() -> None:
    key = (ColumnDescriptor(name="id", type="integer", primary_key=True),)
    crm = ServiceDescriptor(
        name="crm",
        tables=(TableDescriptor(name="customers", entity="Customer", columns=key),),
        referenceable=(ReferenceableDescriptor(table="customers", entity="Customer", key=("region", "id")),),
    )
    shop = ServiceDescriptor(
        name="shop",
        reference_columns=(
            ReferenceColumnDescriptor(
                table="orders", column="customer", target_service="crm", target_table="customers"
            ),
        ),
    )
    text = _render(services_table([crm, shop]))
    assert "references" in text
    assert "customers (region, id) referenceable" in text
    assert "orders.customer → crm.customers" in text
