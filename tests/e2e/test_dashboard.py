"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright), on a
running eShop: the dataflow graph shows every service, a finished checkout's chain of events
is listed in causal order, and a dead letter replayed from the page disappears.

Screenshots go to the test's temporary directory; with ``VMSDB_DOCS_SCREENSHOT=<path>`` the
overview is also written there (the README's picture is made this way).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from sqlalchemy import text

from framework._internal.serving import serving
from framework.dashboard import create_dashboard
from tests.e2e.conftest import Eshop
from vmsdb_eshop.services import SERVICES

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(eshop: Eshop, browser: Browser) -> AsyncIterator[Page]:
    port = free_port()
    async with serving(create_dashboard(eshop.app), "127.0.0.1", port):
        context = await browser.new_context(viewport={"width": 1440, "height": 1000})
        opened = await context.new_page()
        await opened.goto(f"http://127.0.0.1:{port}/")
        await expect(opened.locator("body[data-ready=true]")).to_be_attached(timeout=15_000)
        yield opened
        await context.close()


async def poison_price_update(eshop: Eshop) -> uuid.UUID:
    """A PriceUpdated whose payload does not validate: the cart dead-letters it at once."""
    event_id = uuid.uuid4()
    async with eshop.app.core.admin() as conn:
        await conn.execute(
            text(
                "INSERT INTO vms.events (id, type, key, payload) "
                "VALUES (:id, 'PriceUpdated', '1', CAST(:p AS jsonb))"
            ),
            {"id": event_id, "p": json.dumps({"seller_id": 1, "product_id": 1, "price": "not a price"})},
        )
    await eshop.app.drain()
    return event_id


async def test_dashboard_in_a_real_browser(eshop: Eshop, page: Page, tmp_path: Path) -> None:
    await eshop.add(1, 1, 1, 2)
    await eshop.add(1, 2, 3, 1)
    assert (await eshop.checkout(1, "t-dash")).status_code == 200
    await eshop.app.drain()
    poisoned = await poison_price_update(eshop)

    # The dataflow graph: every eShop service is a node, drawn inside the graph's box.
    await page.wait_for_function("window.vmsdb.cy !== null && window.vmsdb.cy.nodes().length > 0")
    names = await page.evaluate("window.vmsdb.cy.nodes().map(n => n.id())")
    assert {s.service_name() for s in SERVICES} <= set(names)
    boxes = await page.evaluate(
        "window.vmsdb.cy.nodes().map(n => n.renderedBoundingBox())"
        ".map(b => [b.w, b.h, b.x1, b.y1])"
    )
    size = await page.locator("#graph").bounding_box()
    assert size is not None
    for w, h, x1, y1 in boxes:
        assert w > 20 and h > 10 and 0 <= x1 <= size["width"] and 0 <= y1 <= size["height"]
    assert await page.locator("#graph canvas").count() > 0
    await expect(page.locator("#services tbody tr")).to_have_count(len(SERVICES))

    # The correlation view of the finished checkout: its events in the log's causal order.
    await page.fill("#correlation-input", "t-dash")
    await page.click("[data-testid=correlation-show]")
    await expect(page.locator("#chain tbody tr").first).to_be_visible()
    shown = await page.eval_on_selector_all(
        "#chain tbody tr", "rows => rows.map(r => [r.dataset.event, r.dataset.eventId, r.dataset.cause])"
    )
    async with eshop.app.core.admin() as conn:
        logged = (
            await conn.execute(
                text("SELECT type, id FROM vms.events WHERE correlation_id = 't-dash' ORDER BY xid, position")
            )
        ).all()
    assert [(t, i) for t, i, _ in shown] == [(r.type, str(r.id)) for r in logged]
    assert shown[0][0] == "CheckoutRequest"
    seen: set[str] = set()
    for _type, event_id, cause in shown:  # every cause is listed before its effects
        assert cause == "" or cause in seen
        seen.add(event_id)
    types = [t for t, _, _ in shown]
    assert {"ReserveStock", "StockConfirmed", "PaymentConfirmed", "ShipmentNotification"} <= set(types)
    await expect(page.locator("[data-testid=correlation-summary]")).to_contain_text("done")

    # The dead letter shows with its error; fix its cause, replay it from the page.
    row = page.locator("#dead-letters tbody tr")
    await expect(row).to_have_count(1, timeout=10_000)
    await expect(row).to_contain_text("PriceUpdated")
    await expect(row).to_contain_text("payload is not a valid PriceUpdated")
    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    docs = os.environ.get("VMSDB_DOCS_SCREENSHOT")
    if docs:
        shutil.copyfile(tmp_path / "dashboard.png", docs)

    valid = {"seller_id": 1, "product_id": 1, "price": "9.99", "version": "gone", "revision": 0, "tid": "fix"}
    async with eshop.app.core.admin() as conn:
        await conn.execute(
            text("UPDATE vms.events SET payload = CAST(:p AS jsonb) WHERE id = :id"),
            {"p": json.dumps(valid), "id": poisoned},
        )
    await row.locator("[data-action=replay]").click()
    await expect(page.locator("[data-testid=confirm]")).to_be_visible()  # confirmation first
    await expect(row).to_have_count(1)  # nothing happened yet
    await page.screenshot(path=str(tmp_path / "confirm-replay.png"))
    await page.click("[data-testid=confirm-ok]")
    await expect(page.locator("#dead-letters tbody tr")).to_have_count(0, timeout=10_000)
    await expect(page.locator("#dead-letters-empty")).to_be_visible()
    await expect(page.locator("#totals-dead")).to_have_text("0 dead letters")
    await eshop.app.drain()
    async with eshop.app.core.admin() as conn:
        letter = (await conn.execute(text("SELECT replayed_at FROM vms.dead_letters"))).one()
        left = (await conn.execute(text("SELECT count(*) FROM vms.deliveries"))).scalar_one()
    assert letter.replayed_at is not None and left == 0  # replayed, and this time handled
    await page.screenshot(path=str(tmp_path / "after-replay.png"), full_page=True)
    print(f"dashboard screenshots: {tmp_path}")
