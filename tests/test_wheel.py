"""The wheel, as a user gets it: built from the checkout (``python -m build``), installed into a
fresh virtual environment outside it, and run from elsewhere (``vmsdb migrate`` and a short
``vmsdb eshop demo`` on an embedded Postgres). Dependencies come from the package index, through
pip's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# Left out of the copy the wheel is built from: a stale build/ would put old modules in the wheel.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".nox", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".vmsdb", ".pytest_cache", ".mypy_cache", ".ruff_cache", "results",
)  # fmt: skip
# The wheel's own names, and framework/dbcore; anything else would collide in site-packages.
_OWN_TOP_LEVEL = frozenset({"framework", "dbcore"})


def _run(
    command: Sequence[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> str:
    """Run ``command``; on a non-zero exit fail with its whole output. Returns stdout + stderr."""
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = f"$ {' '.join(map(str, command))}\n{result.stdout}{result.stderr}"
    assert result.returncode == 0, f"exit code {result.returncode} (cwd {cwd}):\n{output}"
    return output


def top_level_names(wheel: Path) -> set[str]:
    """The importable top-level names a wheel installs (packages and modules, not its metadata)."""
    names = set()
    for entry in zipfile.ZipFile(wheel).namelist():
        first = entry.split("/", 1)[0]
        if first.endswith((".dist-info", ".data")):
            continue
        names.add(first.removesuffix(".py") if "/" not in entry else first)
    return names


def foreign_names(names: set[str]) -> list[str]:
    """The names of ``names`` a wheel of vmsdb must not install."""
    return sorted(n for n in names if n not in _OWN_TOP_LEVEL and not n.startswith("vmsdb"))


def test_foreign_names_are_the_generic_ones() -> None:
    assert foreign_names({"framework", "dbcore", "vmsdb_eshop", "vmsdb_alembic", "vmsdb"}) == []
    assert foreign_names({"framework", "examples", "benchmarks", "alembic", "tests"}) == [
        "alembic",
        "benchmarks",
        "examples",
        "tests",
    ]


@dataclass(frozen=True)
class Installed:
    """The wheel installed into a fresh virtual environment; ``cwd`` is outside the checkout."""

    wheel: Path
    bin: Path
    cwd: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300) -> str:
        return _run([self.bin / args[0], *args[1:]], cwd=self.cwd, env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    # Not under pytest's temporary directory: pytest keeps that private (mode 0700, and a pytest
    # session starting elsewhere on the machine resets it so), while the embedded Postgres runs
    # as its own OS user, which must reach its data directory.
    with tempfile.TemporaryDirectory(prefix="vmsdb-wheel-") as tmp:
        yield _install(Path(tmp))


def _install(base: Path) -> Installed:
    assert not base.is_relative_to(ROOT), f"the temporary directory {base} is inside the checkout"
    source, dist, venv, cwd = base / "source", base / "dist", base / "venv", base / "work"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    cwd.mkdir()
    # As a release is built: the sdist, then the wheel from the sdist (so the sdist is complete too).
    _run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=base)
    (wheel,) = dist.glob("vmsdb-*.whl")
    _run([sys.executable, "-m", "venv", venv], cwd=base)
    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel], cwd=base, timeout=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMSDB_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "VMSDB_DATA_DIR": str(base / "data"),
        "COLUMNS": "200",  # rich tables wide enough to read in a failure message
    }
    return Installed(wheel, venv / "bin", cwd, env)


def test_the_wheel_installs_only_its_own_top_level_names(installed: Installed) -> None:
    names = top_level_names(installed.wheel)
    assert foreign_names(names) == [], f"{installed.wheel.name} installs top-level {sorted(names)}"
    assert {"framework", "dbcore", "vmsdb_alembic", "vmsdb_eshop", "vmsdb_bench"} <= names, names


def test_the_installed_packages_come_from_the_wheel(installed: Installed) -> None:
    packages = "dbcore, framework, vmsdb_alembic, vmsdb_bench, vmsdb_eshop"
    out = installed.run(
        "python", "-c", f"import {packages}; print(*(p for m in ({packages}) for p in m.__path__), sep='\\n')"
    )  # fmt: skip
    folders = [Path(line) for line in out.splitlines()[1:]]
    assert len(folders) == 5, out
    assert all(not f.is_relative_to(ROOT) and "site-packages" in f.parts for f in folders), out


def test_vmsdb_help_lists_the_plugged_in_commands(installed: Installed) -> None:
    out = installed.run("vmsdb", "--help")
    assert "eshop" in out and "bench" in out, out


def test_migrate_and_a_short_demo_run_outside_the_checkout(installed: Installed) -> None:
    out = installed.run("vmsdb", "migrate", "vmsdb_eshop.app:services")
    assert "core catalog" in out and "service cart" in out, out
    out = installed.run(
        "vmsdb", "eshop", "demo", "--duration", "2", "--concurrency", "2", "--customers", "20",
        "--sellers", "2", "--data-dir", str(installed.cwd / "demo"),
    )  # fmt: skip
    assert "All consistency checks hold" in out, out


def test_the_http_api_serves_from_the_installed_wheel(installed: Installed) -> None:
    installed.run("vmsdb", "migrate", "vmsdb_eshop.app:services")  # serve refuses a database behind
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [installed.bin / "vmsdb", "eshop", "serve", "--port", str(port)],
        cwd=installed.cwd,
        env=installed.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        spec = _openapi_when_up(port, server, deadline=time.monotonic() + 120)
        assert "/cart/{customer_id}/checkout" in spec["paths"], sorted(spec["paths"])
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


def _openapi_when_up(port: int, server: subprocess.Popen[str], deadline: float) -> dict[str, Any]:
    while True:
        if server.poll() is not None:
            out = server.stdout.read() if server.stdout else ""
            raise AssertionError(f"vmsdb eshop serve exited with {server.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=5) as answer:
                body: dict[str, Any] = json.load(answer)
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_bench_is_plugged_in(installed: Installed) -> None:
    assert "handler" in installed.run("vmsdb", "bench", "--help")
