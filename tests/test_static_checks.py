"""Lint and type checks run with the tests, so the README's one test command covers them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "framework", "dbcore", "examples", "tests", "benchmarks", "alembic")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_are_kept() -> None:
    """pyproject's [tool.importlinter]: dbcore below the framework, neither imports the sample."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [lint_imports, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr


def import_cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """The import cycles among ``package``'s modules (its ``__init__`` included): each strongly
    connected set of two or more modules, sorted. Tarjan's algorithm."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    inside = set(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module) & inside):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return sorted(cycles)


def test_import_cycles_are_found_through_a_package_init_too() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in [
        ("pkg", "pkg.a"),  # the package's __init__ re-exports a...
        ("pkg.a", "pkg.b"),
        ("pkg.b", "pkg"),  # ...and b imports the package: a cycle acyclic_siblings would not see
        ("pkg.c", "pkg.d"),
        ("pkg.d", "pkg.e"),
        ("pkg.e", "pkg.c"),
        ("pkg.f", "pkg.a"),
        ("pkg.a", "other"),
        ("other", "pkg.f"),  # through another package: not a cycle inside pkg
    ]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph, "pkg") == [["pkg", "pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.e"]]
    assert import_cycles(graph, "other") == []


def _assert_acyclic(package: str) -> None:
    # As import-linter builds it: imports under `if TYPE_CHECKING:` count.
    cycles = import_cycles(grimp.build_graph(package), package)
    assert cycles == [], f"import cycles in {package}, each among:\n" + "\n".join(
        ", ".join(c) for c in cycles
    )


def test_framework_has_no_import_cycle() -> None:
    _assert_acyclic("framework")


def test_dbcore_has_no_import_cycle() -> None:
    _assert_acyclic("dbcore")


def test_the_command_line_loads_no_sample_and_no_benchmark() -> None:
    """`import framework.cli` (every `vmsdb` command) imports neither; they come by entry point."""
    probe = (
        "import sys, framework.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'vmsdb_eshop', 'vmsdb_bench', 'examples', 'benchmarks'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
