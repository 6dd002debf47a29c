"""A relay-only process for the Kafka failover tests.

``python -m tests.integration.kafka_relay_worker <database_url> <bootstrap> <topic_prefix>``
starts an App with no services and the Kafka relay on, prints ``ready`` once started and
``leader`` when its relay takes the relay lock, and runs until killed (or SIGTERM).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from framework import App


async def run(database_url: str, bootstrap: str, prefix: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with App(
        [],
        database_url=database_url,
        kafka_bootstrap=bootstrap,
        kafka_topic_prefix=prefix,
        workers=False,
    ) as app:
        print("ready", flush=True)
        relay = app._kafka.relay
        while not relay.leader:
            try:
                await asyncio.wait_for(stop.wait(), 0.02)
                return
            except TimeoutError:
                pass
        print("leader", flush=True)
        await stop.wait()


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit("usage: python -m tests.integration.kafka_relay_worker <database_url> <bootstrap> <prefix>")
    asyncio.run(run(*argv))


if __name__ == "__main__":
    main(sys.argv[1:])
