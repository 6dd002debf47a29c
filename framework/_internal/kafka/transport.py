"""``KafkaTransport``: the relay and the ingress of one App, started and stopped together.

``App.start`` creates it when ``kafka_bootstrap`` is set (and only then imports this package):

- the relay (``kafka_relay``, default on) publishes every event that started in this core;
- the ingress (services in ``kafka_remote``, or topics in ``kafka_ingress``) feeds those
  services' ``@Inbound`` handlers from Kafka, through this core's event log.

Service code is the same with or without Kafka: only where the events come from changes.
"""

from __future__ import annotations

import logging

from framework._internal.host import Host
from framework._internal.kafka.ingress import Ingress
from framework._internal.kafka.options import KafkaOptions
from framework._internal.kafka.relay import Relay
from framework._internal.kafka.routing import Routing

__all__ = ["KafkaTransport"]

log = logging.getLogger("vmsdb.kafka")


class KafkaTransport:
    """The Kafka side of a running App. Raises ``KafkaSetupError`` at start on bad options."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.options = KafkaOptions.from_settings(host.settings)
        self.routing = Routing.build(host.plans, self.options)
        self.relay: Relay | None = None
        self.ingress: Ingress | None = None

    async def start(self) -> None:
        core = self.host.core
        if self.options.relay:
            self.relay = Relay(core.core_engine.url, self.options)  # as the core role
            await self.relay.start()
        if self.routing.topics:
            self.ingress = Ingress(core, self.options, self.routing)
            await self.ingress.start()
        log.info(
            "Kafka transport on %s: relay %s; ingress %s",
            self.options.bootstrap,
            "on" if self.relay else "off",
            f"{self.ingress.group_id} <- {', '.join(self.routing.topics)}" if self.ingress else "off",
        )

    async def stop(self) -> None:
        # Ingress first: nothing new goes into the log while the relay finishes its batch.
        if self.ingress is not None:
            await self.ingress.stop()
            self.ingress = None
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
