"""The Kafka transport (G11): an outbox relay to Kafka, and Kafka ingress for ``@Inbound`` handlers.

Imported only when ``VMSDB_KAFKA_BOOTSTRAP`` (``kafka_bootstrap``) is set; without it an App runs
on in-database delivery alone and never imports aiokafka.
"""

from framework._internal.kafka.ingress import Ingress
from framework._internal.kafka.options import KafkaOptions, KafkaSetupError, sanitize_topic
from framework._internal.kafka.relay import Relay
from framework._internal.kafka.routing import Routing
from framework._internal.kafka.transport import KafkaTransport

__all__ = [
    "Ingress",
    "KafkaOptions",
    "KafkaSetupError",
    "KafkaTransport",
    "Relay",
    "Routing",
    "sanitize_topic",
]
