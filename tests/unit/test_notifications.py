"""Reading the event log's notification: subscribers, and each correlation's committed types."""

from __future__ import annotations

import pytest

from dbcore.notifications import EventsNotification, parse_events_notification


def test_subscribers_and_the_types_of_each_correlation() -> None:
    parsed = parse_events_notification("order,payment\ntid-1=StockConfirmed|InvoiceIssued,tid-2=Paid")
    assert parsed == EventsNotification(
        ("order", "payment"),
        {"tid-1": frozenset({"StockConfirmed", "InvoiceIssued"}), "tid-2": frozenset({"Paid"})},
    )


@pytest.mark.parametrize(
    ("payload", "subscribers", "committed"),
    [
        ("cart\n", ("cart",), {}),  # events without a correlation
        ("\ntid=Done", (), {"tid": frozenset({"Done"})}),  # no subscriber
        ("stock", ("stock",), {}),  # a wake-up (dbcore.delivery): no second line at all
        ("", (), {}),
        ("order\n*", ("order",), None),  # too long to list: any correlation
        ("\n=Done", (), {"": frozenset({"Done"})}),  # an empty correlation id is one too
    ],
)
def test_what_a_payload_leaves_out(
    payload: str, subscribers: tuple[str, ...], committed: dict[str, frozenset[str]] | None
) -> None:
    assert parse_events_notification(payload) == EventsNotification(subscribers, committed)


def test_separators_inside_names_come_back_whole() -> None:
    """vms.notify_part writes '%', ',', '=' and '|' as %XX ('%' first): the reading is exact,
    a '%XX' that was in the name included, and a correlation named '*' is not the wildcard."""
    payload = "\na%2Cb%3Dc%7Cd%252C=odd%2C%3D%7C%25type|Plain,%252A=x,*=y"
    assert parse_events_notification(payload).committed == {
        "a,b=c|d%2C": frozenset({"odd,=|%type", "Plain"}),
        "%2A": frozenset({"x"}),
        "*": frozenset({"y"}),
    }


def test_a_correlation_listed_without_types_may_have_any() -> None:
    """The list an older fan-out sends (correlations alone): each may have committed any type."""
    parsed = parse_events_notification("shipment\ntid-1,tid-2")
    assert parsed.committed == {"tid-1": None, "tid-2": None}
