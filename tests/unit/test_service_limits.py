"""``ServiceLimits`` (issue 17, part 3): checked at class definition, carried by the descriptor
(JSON, so the catalog and ``vmsdb services --json`` have them), shown by ``vmsdb services``; and
the slots that cap a service's running calls."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dbcore.core import PoolSize
from dbcore.descriptor import LimitsDescriptor, ServiceDescriptor
from framework import AnnotationError, Service, ServiceLimits, Transactional
from framework._internal.descriptors import build_descriptors
from framework._internal.limits import Slots
from framework.cli import cli


class Stock(
    Service,
    name="stock_limited",
    limits=ServiceLimits(concurrency=8, connections=10, statement_timeout=timedelta(seconds=2)),
):
    @Transactional(type="RO")
    async def count(self) -> int:
        return 0


class Free(Service, name="free_of_limits"):
    pass


SERVICES = [Stock, Free]


def test_limits_are_part_of_the_descriptor_and_survive_json() -> None:
    stock, free = build_descriptors(SERVICES)
    assert stock.limits == LimitsDescriptor(concurrency=8, connections=10, statement_timeout_ms=2000)
    assert free.limits == LimitsDescriptor()  # no limits: today's behaviour
    data = json.loads(json.dumps(stock.to_json()))
    assert data["limits"] == {"concurrency": 8, "connections": 10, "statement_timeout_ms": 2000}
    assert ServiceDescriptor.from_json(data) == stock
    assert stock.fingerprint() != stock.model_copy(update={"limits": LimitsDescriptor()}).fingerprint()


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        (ServiceLimits(concurrency=0), "concurrency must be a positive integer"),
        (ServiceLimits(connections=-3), "connections must be a positive integer"),
        (ServiceLimits(concurrency=True), "concurrency must be a positive integer"),
        (ServiceLimits(statement_timeout=timedelta(0)), "statement_timeout must be a timedelta"),
        (ServiceLimits(statement_timeout=2), "statement_timeout must be a timedelta"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_limit_is_refused_at_class_definition_naming_the_service(
    limits: ServiceLimits, problem: str
) -> None:
    with pytest.raises(AnnotationError, match=problem) as raised:

        class Bad(Service, name="bad_limits", limits=limits):
            pass

    assert "'bad_limits'" in str(raised.value)


def test_limits_must_be_service_limits() -> None:
    with pytest.raises(AnnotationError, match="must be a ServiceLimits"):

        class Bad(Service, name="bad_limits", limits={"concurrency": 3}):  # type: ignore[arg-type]
            pass


def test_a_descriptor_refuses_a_limit_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        LimitsDescriptor.model_validate({"concurrency": 0})


def test_vmsdb_services_shows_the_limits(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(
        cli, ["services", f"{__name__}:SERVICES", "--graph", str(tmp_path / "flow")], env={"COLUMNS": "400"}
    )
    assert shown.exit_code == 0, shown.output
    rows = [" ".join(line.split("│")[-2].split()) for line in shown.output.splitlines() if "│" in line]
    assert rows[:3] == ["concurrency=8", "connections=10", "statement_timeout=2000ms"]
    assert "-" in rows[3:]  # the service without limits
    as_json = runner.invoke(cli, ["services", f"{__name__}:SERVICES", "--json"])
    by_name = {d["name"]: d for d in json.loads(as_json.output)}
    assert by_name["stock_limited"]["limits"]["statement_timeout_ms"] == 2000
    assert by_name["free_of_limits"]["limits"] == {
        "concurrency": None,
        "connections": None,
        "statement_timeout_ms": None,
    }


async def test_slots_admit_at_most_size_and_serve_waiters_in_order() -> None:
    freed: list[int] = []
    slots = Slots(2, on_release=lambda: freed.append(slots.running))
    assert slots.try_acquire() and slots.try_acquire()
    assert not slots.try_acquire()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await slots.acquire()
        order.append(name)

    first, second = asyncio.create_task(waiter("a")), asyncio.create_task(waiter("b"))
    await asyncio.sleep(0)
    assert order == [] and slots.running == 2
    slots.release()  # handed to "a": still two running, nobody told a slot is free
    await first
    assert order == ["a"] and slots.running == 2 and freed == []
    assert not slots.try_acquire()  # "b" waits first: a worker does not jump the line
    slots.release()
    await second
    slots.release()
    slots.release()
    assert slots.running == 0 and freed == [1, 0]


async def test_a_cancelled_waiter_gives_up_its_place() -> None:
    slots = Slots(1)
    assert slots.try_acquire()
    task = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slots.release()
    assert slots.running == 0 and slots.try_acquire()


def test_pools_keep_what_each_login_can_use_and_share_the_server_budget() -> None:
    """Issue 14: no overflow connections (each closed on return is a new session and a SCRAM
    handshake at the next burst); a service's pool is what it can use at once, capped by its
    limits; when the server cannot admit them all, every pool shrinks in proportion to a
    share per process."""
    from framework import App
    from framework._internal.app import _ADMIN_HEADROOM

    app = App(SERVICES, worker_concurrency=16, pool_size=10, database_url="postgresql://unused/db")
    app._size_pools(budget=1000)
    assert app._pools[None] == PoolSize(20, 0)  # housekeeping: pool_size + 10
    assert app._pools["free_of_limits"] == PoolSize(20, 0)  # worker_concurrency + 4
    assert app._pools["stock_limited"] == PoolSize(8, 0)  # concurrency=8 < connections=10

    app._size_pools(budget=_ADMIN_HEADROOM + 24)
    assert sum(p.size for p in app._pools.values()) <= 24
    assert all(p.size >= 2 and p.overflow == 0 for p in app._pools.values())

    two = App(SERVICES, worker_concurrency=16, processes=2, database_url="postgresql://unused/db")
    two._size_pools(budget=_ADMIN_HEADROOM + 48)
    assert sum(p.size for p in two._pools.values()) <= 24  # half of 48 each
