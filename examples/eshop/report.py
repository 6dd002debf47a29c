"""Rich renderings of a workload's results and of the consistency verdict."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from vmsdb_eshop.check import Verdict
from vmsdb_eshop.workload import WorkloadResult

__all__ = ["outcome_line", "verdict_table", "workload_table"]


def workload_table(result: WorkloadResult) -> Table:
    """Per transaction type: count, aborts, share, p50/p90 latency; then throughput."""
    total = sum(s.count for s in result.stats.values()) or 1
    table = Table(
        title=f"Workload: {result.duration:.1f} s, {result.throughput:.1f} TPS", title_justify="left"
    )
    for column in ("transaction", "count", "share", "aborts", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "transaction" else "right")
    for kind, stats in result.stats.items():
        if not stats.count:
            continue  # not in the mix (vmodb has no delivery)
        table.add_row(
            kind.value,
            str(stats.count),
            f"{100 * stats.count / total:.1f}%",
            str(stats.aborts),
            f"{stats.percentile(50):.1f}",
            f"{stats.percentile(90):.1f}",
            f"{stats.percentile(99):.1f}",
        )
    table.add_section()
    table.add_row(
        "all",
        str(sum(s.count for s in result.stats.values())),
        "100%",
        str(sum(s.aborts for s in result.stats.values())),
        "",
        "",
        "",
    )
    return table


def outcome_line(result: WorkloadResult) -> str:
    """How checkouts ended, aborts by cause, and the live anomalies."""
    outcomes = ", ".join(f"{name} {n}" for name, n in sorted(result.outcomes.items())) or "none"
    aborts = ", ".join(f"{kind} {cause}: {n}" for (kind, cause), n in sorted(result.aborts.items())) or "none"
    return (
        f"Checkouts: {outcomes}\nAborts by cause: {aborts}\n"
        f"Inconsistent dashboards (live): {result.dashboard_anomalies} of {result.ledger.dashboards}"
    )


def verdict_table(verdict: Verdict) -> Table:
    """One row per check: whether it holds, and how many cases it looked at."""
    table = Table(title="Consistency check", title_justify="left")
    table.add_column("check")
    table.add_column("verdict")
    table.add_column("details")
    for result in verdict.results:
        mark = Text("holds", style="bold green") if result.ok else Text("VIOLATED", style="bold red")
        table.add_row(result.name, mark, result.summary())
    return table
