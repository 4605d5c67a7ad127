"""`python -m sona stats`: the figures job_stats() computes in SQL, as a table for a terminal."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value}{unit}"


def render_table(figures: dict[str, Any]) -> str:
    rate = figures.get("failure_rate")
    stuck = figures.get("stuck") or {}
    lines = [
        f"Jobs created in the last {figures['window_hours']} h: {figures['total']}",
        "",
        "  status       jobs",
        *(f"  {status:<11} {count:>5}" for status, count in sorted(figures["by_status"].items())),
        "",
        f"  failure rate        {_fmt(None if rate is None else round(rate * 100, 2), ' %')}",
        f"  processing, average {_fmt(figures.get('avg_processing_s'), ' s')}",
        f"  processing, p95     {_fmt(figures.get('p95_processing_s'), ' s')}",
        f"  expired leases      {stuck.get('expired_leases', 0)}",
        f"  pending > 10 min    {stuck.get('pending_over_10_min', 0)}",
    ]
    failures = figures.get("recent_failures") or []
    if failures:
        lines += ["", "Recent failures:"]
        lines += [
            f"  {f['failed_at']}  {f['id']}  (attempts {f['attempts']})  {f['error']}" for f in failures
        ]
    return "\n".join(lines)
