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
    lines += _spend_lines(figures.get("spend") or {})
    failures = figures.get("recent_failures") or []
    if failures:
        lines += ["", "Recent failures:"]
        lines += [
            f"  {f['failed_at']}  {f['id']}  (attempts {f['attempts']})  {f['error']}" for f in failures
        ]
    return "\n".join(lines)


def _spend_lines(spend: dict[str, Any]) -> list[str]:
    """The pause (if any), quota refusals and cancellations: what protects the credit balance."""
    if not spend:
        return []
    pause = spend.get("pause")
    quota = spend.get("quota") or {}
    lines = [""]
    if pause:
        lines.append(
            f"PAUSED since {pause['since']} ({pause['code']}: {pause['reason']}); "
            f"next probe after {pause['until']}, {pause['jobs_released']} jobs waiting for it"
        )
    else:
        lines.append("  service             running (no pause)")
    lines += [
        f"  pauses              {spend.get('pauses_in_window', 0)}"
        f" ({spend.get('jobs_released_by_outages', 0)} jobs sent back to wait)",
        f"  cancelled           {spend.get('cancelled', 0)}",
        f"  quota refusals      {quota.get('refused_active_total', 0)} over"
        f" {quota.get('max_active_jobs', '-')} active, {quota.get('refused_daily_total', 0)} over"
        f" {quota.get('max_jobs_per_day', '-')} a day (since install)",
    ]
    return lines
