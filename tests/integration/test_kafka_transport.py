"""Transport selection and Kafka options: without ``VMSDB_KAFKA_BOOTSTRAP`` nothing of Kafka is
even imported; with it, options that do not fit the App fail at start-up, naming what is wrong.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from framework import App
from framework._internal.kafka import KafkaSetupError, sanitize_topic
from framework.testing.kafka import KafkaBroker

from .kafka_services import Signup, Tally

ROOT = Path(__file__).resolve().parents[2]

_WITHOUT_KAFKA = """
import asyncio, sys
from framework import App
from tests.integration.services import Bank, Deposit

async def main(url):
    async with App([Bank], database_url=url, create_tables=True) as app:
        await app.service(Bank).open("a")
        await app.publish(Deposit(account="a", amount=5))
        await app.drain()
        assert await app.service(Bank).balance("a") == 5
    loaded = sorted(m for m in sys.modules if "kafka" in m)
    assert not loaded, loaded
    print("no kafka")

asyncio.run(main(sys.argv[1]))
"""


async def test_without_bootstrap_the_app_runs_on_the_database_alone(vmsdb_database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMSDB_KAFKA")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WITHOUT_KAFKA,
        vmsdb_database,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["no", "kafka"]


async def test_remote_service_not_in_the_app_fails_at_start(
    vmsdb_app_factory, vmsdb_kafka_broker: KafkaBroker, vmsdb_kafka_topic_prefix: str
) -> None:
    with pytest.raises(KafkaSetupError, match=r"kafka_remote names cart, which this App does not run"):
        async with vmsdb_app_factory(
            [Tally], kafka_bootstrap=vmsdb_kafka_broker.bootstrap, kafka_remote=["cart"]
        ):
            pass


async def test_ingress_topic_for_an_unhandled_event_fails_at_start(
    vmsdb_app_factory, vmsdb_kafka_broker: KafkaBroker
) -> None:
    from .services import Bank

    with pytest.raises(KafkaSetupError, match=r"topic 'signups' to Signup, but no @Inbound handler"):
        async with vmsdb_app_factory(
            [Bank], kafka_bootstrap=vmsdb_kafka_broker.bootstrap, kafka_ingress={"signups": Signup}
        ):
            pass


def test_topic_names_are_sanitized() -> None:
    assert sanitize_topic("shop/Order Placed:v2") == "shop_Order_Placed_v2"
    assert sanitize_topic("a.b-c_D9") == "a.b-c_D9"
    assert len(sanitize_topic("x" * 400)) == 249
    with pytest.raises(KafkaSetupError):
        sanitize_topic("..")


def test_app_options_reach_the_transport() -> None:
    from framework._internal.kafka import KafkaOptions

    app = App(
        [Tally],
        kafka_bootstrap="127.0.0.1:1",
        kafka_topic_prefix="shop.",
        kafka_topics={"Signup": "users.signups"},
    )
    options = KafkaOptions.from_settings(app.settings)
    assert options.topic_for("Placed") == "shop.Placed"
    assert options.topic_for("Signup") == "users.signups"


def test_a_precedence_cycle_over_kafka_is_refused_at_start() -> None:
    """The ingress holds a B until the A's before it are in: with A's also held for B's, both
    would wait for ever. In-database delivery orders such a cycle by commit and accepts it."""
    from framework import Event, Inbound, Service
    from framework._internal.kafka import KafkaOptions
    from framework._internal.kafka.routing import Routing

    class Serve(Event, key="rally"):
        rally: str

    class Volley(Event, key="rally"):
        rally: str

    class Court(Service, name="court"):
        @Inbound(Serve, precedence=Volley)
        async def on_serve(self, ev: Serve) -> None:
            return None

        @Inbound(Volley, precedence=Serve)
        async def on_volley(self, ev: Volley) -> None:
            return None

    local = App([Court])
    assert [p.descriptor.name for p in local.plans] == ["court"]
    app = App([Court], kafka_bootstrap="127.0.0.1:1", kafka_remote=["court"])
    with pytest.raises(
        KafkaSetupError, match=r"forms a cycle \((Serve -> Volley -> Serve|Volley -> Serve -> Volley)\)"
    ):
        Routing.build(app.plans, KafkaOptions.from_settings(app.settings))
