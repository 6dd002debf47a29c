"""The dashboard's JSON API: what it reads, and who may settle a dead letter."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from framework.dashboard import create_dashboard
from framework.testing.plugin import AppFactory
from tests.integration.test_metrics import Receiver, Sender


def client(api: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://127.0.0.1")


async def test_dead_letter_actions_need_the_header_and_can_be_turned_off(
    vmsdb_app_factory: AppFactory,
) -> None:
    async with vmsdb_app_factory([Sender, Receiver]) as app:
        await app.service(Sender).send_parcel("x", poison=True)
        await app.drain(timeout=60)
        async with client(create_dashboard(app)) as http:
            (letter,) = (await http.get("/api/dead-letters")).json()
            assert (letter["subscriber"], letter["event_type"], letter["attempts"]) == (
                "receiver",
                "Parcel",
                2,
            )
            assert "poisonous" in letter["error"] and "on_parcel" in letter["traceback"]
            # A form post from another page cannot add the header: refused, nothing settled.
            refused = await http.post(f"/api/dead-letters/{letter['id']}/discard")
            assert refused.status_code == 403
            assert len((await http.get("/api/dead-letters")).json()) == 1
            graph = (await http.get("/api/graph")).json()
            assert {n["id"]: n["dead_letters"] for n in graph["nodes"]}["receiver"] == 1
            edge = next(e for e in graph["edges"] if e["event"] == "Parcel")
            assert (edge["source"], edge["target"]) == ("sender", "receiver") and edge["rate"] > 0
        async with client(create_dashboard(app, actions=False)) as http:
            read_only = await http.post(
                f"/api/dead-letters/{letter['id']}/discard", headers={"X-Vmsdb-Action": "1"}
            )
            assert read_only.status_code == 403
        async with client(create_dashboard(app)) as http:
            headers = {"X-Vmsdb-Action": "1"}
            done = await http.post(f"/api/dead-letters/{letter['id']}/replay", headers=headers)
            assert done.status_code == 200
            assert (await http.get("/api/dead-letters")).json() == []
            again = await http.post(f"/api/dead-letters/{letter['id']}/replay", headers=headers)
            assert again.status_code == 409


async def test_correlation_lists_the_chain_with_outcomes(vmsdb_app_factory: AppFactory) -> None:
    async with vmsdb_app_factory([Sender, Receiver]) as app:
        await app.service(Sender).send_parcel("y")
        await app.drain()
        async with client(create_dashboard(app)) as http:
            assert (await http.get("/api/correlation", params={"id": "nope"})).json()["events"] == []
            async with app.core.admin() as conn:
                from sqlalchemy import text

                await conn.execute(text("UPDATE vms.events SET correlation_id = 'c-1'"))
            chain = (await http.get("/api/correlation", params={"id": "c-1"})).json()
    assert chain["outcome"] == "done"
    (event,) = chain["events"]
    assert (event["type"], event["producer"], event["depth"]) == ("Parcel", "sender", 0)
    assert event["deliveries"] == [
        {"subscriber": "receiver", "state": "handled", "attempts": None, "error": None}
    ]
