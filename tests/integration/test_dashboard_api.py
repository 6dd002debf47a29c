"""The dashboard's JSON API: what it reads, and who may settle a dead letter."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
from fastapi import FastAPI

from framework import Service, ServiceLimits, Transactional
from framework.dashboard import create_dashboard
from framework.testing.plugin import AppFactory
from tests.integration.observed_services import Receiver, Sender


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


ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests.integration.observed_services:app"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def answered(url: str, process: subprocess.Popen[str], timeout: float = 60.0) -> httpx.Response:
    """The first answer of ``url`` once the command serves it."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            assert process.poll() is None, process.communicate()
            try:
                return await http.get(url)
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"{url} never answered"
                await asyncio.sleep(0.2)


def command(*args: str, database: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from framework.cli import main; main()", *args],
        cwd=ROOT,
        env={**os.environ, "VMSDB_DATABASE_URL": database},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stopped(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    return process.returncode, out + err


async def test_vmsdb_dashboard_serves_the_page_on_127_0_0_1(vmsdb_database: str) -> None:
    port = free_port()
    process = command("dashboard", TARGET, "--port", str(port), database=vmsdb_database)
    try:
        overview = await answered(f"http://127.0.0.1:{port}/api/overview", process)
        assert overview.json() == {"services": ["sender", "receiver"], "actions": True}
        async with httpx.AsyncClient() as http:
            page = await http.get(f"http://127.0.0.1:{port}/")
            script = await http.get(f"http://127.0.0.1:{port}/static/vendor/cytoscape.min.js")
        assert page.status_code == 200 and "<title>vmsdb dashboard</title>" in page.text
        assert script.status_code == 200 and "cytoscape" in script.text[:2000].lower()
    finally:
        code, output = stopped(process)
    assert code == 0, output
    assert f"vmsdb dashboard: http://127.0.0.1:{port}/" in output


async def test_vmsdb_run_serves_metrics_on_its_port(vmsdb_database: str) -> None:
    port = free_port()
    process = command("run", TARGET, "--metrics-port", str(port), database=vmsdb_database)
    try:
        response = await answered(f"http://127.0.0.1:{port}/metrics", process)
    finally:
        code, output = stopped(process)
    assert response.status_code == 200
    assert 'vmsdb_deliveries_pending{event="Parcel",subscriber="receiver"} 0.0' in response.text
    assert code == 0, output


async def test_recovery_leases_and_integrity_read_back(vmsdb_app_factory: AppFactory) -> None:
    async with vmsdb_app_factory([Sender, Receiver]) as app:
        sender = app.service(Sender)
        await sender.fill("s9", 5)
        assert await sender.reserve("s9", 2, timedelta(hours=1)) is not None
        async with client(create_dashboard(app)) as http:
            (lease,) = (await http.get("/api/leases")).json()
            recovery = (await http.get("/api/recovery")).json()
            again = (await http.post("/api/integrity")).json()
    assert (lease["service"], lease["entity"], lease["expired"]) == ("sender", "shelves", False)
    assert "s9" in lease["key_text"] and float(lease["quantity"]) == 2
    assert recovery["services"] == [
        {"service": "sender", "mode": None},
        {"service": "receiver", "mode": None},
    ]
    assert recovery["recoveries"] == [] and recovery["amnesia"] == []
    assert recovery["integrity"]["verdict"] == "globally consistent"
    assert again["verdict"] == "globally consistent"
    assert again["checked_at"] >= recovery["integrity"]["checked_at"]


class Capped(Service, name="dash_capped", limits=ServiceLimits(concurrency=2, connections=5)):
    @Transactional
    async def noop(self) -> None: ...


async def test_the_graph_shows_each_services_declared_limits(vmsdb_app_factory: AppFactory) -> None:
    async with vmsdb_app_factory([Capped, Sender, Receiver]) as app:
        api = create_dashboard(app)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as http:
            nodes = {n["id"]: n for n in (await http.get("/api/graph")).json()["nodes"]}
    assert nodes["dash_capped"]["limits"] == {"concurrency": 2, "connections": 5}
    assert nodes["sender"]["limits"] == {}
