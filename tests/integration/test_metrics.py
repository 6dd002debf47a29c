"""Prometheus metrics: scraped from ``/metrics`` of an attached App while it works, and from
``vmsdb run``'s metrics port; counts equal what the test did, gauges show the core's state."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from framework.fastapi import attach, run_lifespan
from framework.testing import advance_clock
from framework.testing.plugin import AppFactory
from tests.integration.observed_services import Receiver, Sender

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(body: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def scrape(api: FastAPI) -> Samples:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://app") as http:
        response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_scrape_during_a_workload_counts_what_happened(vmsdb_app_factory: AppFactory) -> None:
    boxes = [f"b{i}" for i in range(20)]
    # First only the producer runs: the deliveries wait, and the backlog shows.
    async with vmsdb_app_factory([Sender, Receiver], workers=["sender"]) as producer:
        api = attach(FastAPI(), producer)
        async with run_lifespan(api):
            sender = producer.service(Sender)
            for box in boxes:
                await sender.send_parcel(box)
            await sender.send_parcel("bad", poison=True)
            await sender.fill("s1", 10)
            assert await sender.reserve("s1", 3, timedelta(hours=1)) is not None
            assert await sender.reserve("s1", 2, timedelta(seconds=1)) is not None
            assert await sender.reserve("s1", 50, timedelta(hours=1)) is None
            await advance_clock(producer, timedelta(minutes=10))  # the second one has expired
            await asyncio.sleep(0.05)
            waiting = await scrape(api)
    assert total(waiting, "vmsdb_deliveries_pending", subscriber="receiver", event="Parcel") == 21
    assert total(waiting, "vmsdb_delivery_lag_seconds", subscriber="receiver") > 0
    assert total(waiting, "vmsdb_transactions_total", service="sender", function="send_parcel") == 21
    assert total(waiting, "vmsdb_lease_grants_total", service="sender", function="reserve") == 2
    assert total(waiting, "vmsdb_lease_refusals_total", service="sender", function="reserve") == 1
    assert total(waiting, "vmsdb_leases_active", service="sender", function="reserve") == 2
    assert total(waiting, "vmsdb_leases_expired", service="sender", function="reserve") == 1
    assert total(waiting, "vmsdb_recovery_mode", service="receiver", mode="none") == 1
    assert total(waiting, "vmsdb_recovery_mode", service="receiver", mode="consistency") == 0
    assert total(waiting, "vmsdb_pool_size") >= 1
    assert total(waiting, "vmsdb_events_handled_total") == 0

    # Then a second App in the same process handles them; each App counts only its own work.
    async with vmsdb_app_factory([Sender, Receiver], workers=["receiver"]) as consumer:
        api = attach(FastAPI(), consumer)
        async with run_lifespan(api):
            during = asyncio.create_task(scrape(api))  # a scrape while the handlers run
            await consumer.drain(timeout=60)
            await during
            done = await scrape(api)
    parcel = {"service": "receiver", "event": "Parcel"}
    assert total(done, "vmsdb_events_handled_total", **parcel) == 20
    assert total(done, "vmsdb_events_failed_total", **parcel) == 2
    assert total(done, "vmsdb_event_retries_total", **parcel) == 1
    assert total(done, "vmsdb_dead_letters_total", **parcel) == 1
    assert total(done, "vmsdb_dead_letters_unsettled", subscriber="receiver", event="Parcel") == 1
    assert total(done, "vmsdb_deliveries_pending", subscriber="receiver", event="Parcel") == 0
    assert total(done, "vmsdb_delivery_lag_seconds", subscriber="receiver") == 0
    assert total(done, "vmsdb_handler_duration_seconds_count", **parcel) == 20
    assert total(done, "vmsdb_handler_duration_seconds_sum", **parcel) > 0
    assert total(done, "vmsdb_claim_batch_size_sum", service="receiver") == 22  # 21 claims + 1 retry
    assert total(done, "vmsdb_transactions_total", service="sender") == 0  # the other App's
    assert total(done, "vmsdb_transactions_total", service="receiver", function="on_parcel") == 20


async def test_vmsdb_run_metrics_port_serves_the_same_text(vmsdb_app_factory: AppFactory) -> None:
    from framework._internal.serving import serving_metrics

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with vmsdb_app_factory([Sender, Receiver]) as app, serving_metrics(app, port):
        await app.service(Sender).send_parcel("p1")
        await app.drain()
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    samples = parse(response.text)
    assert total(samples, "vmsdb_events_handled_total", service="receiver", event="Parcel") == 1
    assert total(samples, "vmsdb_deliveries_pending", subscriber="receiver") == 0
