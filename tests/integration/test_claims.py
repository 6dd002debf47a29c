"""Claims for several subscribers in one statement (``delivery.claim_batches``), and the App's
dispatchers sharing it (``framework._internal.dispatcher.Claims``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from dbcore import delivery
from dbcore.delivery import ClaimRequest
from framework import App, Event, Inbound, Service, Transactional


class Ping(Event, key="key"):
    key: str


class Alpha(Service, name="alpha"):
    @Inbound(Ping)
    @Transactional(type="RW")
    async def on_ping(self, ev: Ping) -> None:
        pass


class Beta(Service, name="beta"):
    @Inbound(Ping)
    @Transactional(type="RW")
    async def on_ping(self, ev: Ping) -> None:
        pass


class Gamma(Service, name="gamma"):
    @Inbound(Ping)
    @Transactional(type="RW")
    async def on_ping(self, ev: Ping) -> None:
        pass


SERVICES = [Alpha, Beta, Gamma]


async def claimed_by(app: App) -> dict[tuple[str, str], bool]:
    """(subscriber, key of the event) -> whether that delivery is claimed, for every delivery."""
    async with app.core.admin() as conn:
        rows = await conn.execute(
            text(
                "SELECT d.subscriber, e.payload->>'key' AS key, e.position, d.claim IS NOT NULL AS claimed "
                "FROM vms.deliveries d JOIN vms.events e ON e.position = d.position ORDER BY e.position"
            )
        )
        return {(r.subscriber, f"{r.key}#{r.position}"): r.claimed for r in rows}


async def test_one_statement_claims_for_each_subscriber_its_own(vmsdb_app_factory: Any) -> None:
    async with vmsdb_app_factory(SERVICES, workers=False) as app:
        for key in ("k1", "k1", "k2", "k3"):
            await app.publish(Ping(key=key))
        async with app.core.housekeeping_autocommit() as conn:
            claims = await delivery.claim_batches(
                conn,
                [ClaimRequest("alpha", 10, precedence=False), ClaimRequest("beta", 1, precedence=True)],
                lease_seconds=30,
            )
        state = await claimed_by(app)

    assert set(claims) == {"alpha", "beta"}
    alpha, beta = claims["alpha"], claims["beta"]
    # alpha: the head of each key (k1's second waits behind its first), none of another's.
    assert [i.key for i in alpha.items] == ["k1", "k2", "k3"]
    assert {i.subscriber for i in alpha.items} == {"alpha"}
    assert alpha.blocked and not alpha.held_back
    # beta: its limit, the oldest first.
    assert [(i.subscriber, i.key) for i in beta.items] == [("beta", "k1")]
    # Exactly those rows: gamma, not asked for, has every delivery unclaimed, although the
    # same events' deliveries to alpha and beta were claimed.
    assert sum(state.values()) == 4
    assert not any(claimed for (subscriber, _), claimed in state.items() if subscriber == "gamma")
    assert claims["alpha"].horizon == claims["beta"].horizon  # one snapshot


async def test_dispatchers_woken_together_claim_in_one_statement(
    vmsdb_app_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One notification names three subscribers of this App: their three dispatchers wake at
    once and share one claim statement."""
    calls: list[list[str]] = []
    original = delivery.claim_batches

    async def recorded(conn: Any, requests: Any, **kwargs: Any) -> Any:
        calls.append(sorted(r.subscriber for r in requests))
        return await original(conn, requests, **kwargs)

    monkeypatch.setattr(delivery, "claim_batches", recorded)
    async with vmsdb_app_factory(SERVICES, poll_interval=60.0) as app:
        await asyncio.sleep(0.2)  # the start-up claims are done
        calls.clear()
        await app.publish(Ping(key="k"))
        await app.drain()
    assert calls and calls[0] == ["alpha", "beta", "gamma"], calls
