"""Tracing is configured by the standard OTEL_* variables only, and is off without them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio
    from framework._internal import telemetry

    async def main():
        on = telemetry.configure()
        print("on" if on else "off", flush=True)
        async def work():
            return telemetry.traceparent()
        print(await telemetry.traced(work(), "probe", {"vmsdb.kind": "test"}), flush=True)

    asyncio.run(main())
    """
)


def run(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_off_without_configuration_and_when_disabled() -> None:
    for env in (
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"},
    ):
        done = run(**env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["off", "None"], env


def test_the_console_exporter_named_by_the_environment_prints_the_span() -> None:
    done = run(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="shop-api")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "on" and lines[1].startswith("00-")
    trace_id = lines[1].split("-")[1]
    assert '"name": "probe"' in done.stdout and trace_id in done.stdout
    assert '"service.name": "shop-api"' in done.stdout


def test_an_exporter_that_is_not_installed_is_named_in_the_error() -> None:
    done = run(OTEL_TRACES_EXPORTER="zipkin_nope")
    assert done.returncode != 0
    assert "OTEL_TRACES_EXPORTER names 'zipkin_nope', which is not installed" in done.stderr
