"""`python -m sona stats`: the figures job_stats() computes in SQL, as a table for a terminal."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sona.errors import SonaError

if TYPE_CHECKING:
    from sona.store.jobs import JobsStore

# How long `stats` spends folding what the scheduler has not folded yet, a day of hours per call (each
# call one short transaction, well inside a statement timeout), before it reads the figures anyway.
FOLD_BUDGET_S = 60.0


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value}{unit}"


def _percent(rate: float | None) -> str:
    return _fmt(None if rate is None else round(rate * 100, 2), " %")


def _pair(figure: dict[str, Any] | None, low: str = "p50", high: str = "p95") -> str:
    figure = figure or {}
    return f"{_fmt(figure.get(low), ' s')} / {_fmt(figure.get(high), ' s')}"


def _attempt_lines(figures: dict[str, Any]) -> list[str]:
    attempts = figures.get("attempts") or {}
    by_class = attempts.get("failed_by_class") or {}
    lines = [f"Attempts ended: {attempts.get('ended', 0)}; failed by class (share of attempts):"]
    lines += [
        f"  {kind:<19} {entry['count']:>5}  {_percent(entry['rate'])}"
        for kind, entry in sorted(by_class.items())
    ]
    if not by_class:
        lines.append("  (none)")
    return lines


def _figure_lines(figures: dict[str, Any]) -> list[str]:
    throughput = figures.get("throughput") or {}
    busiest = throughput.get("busiest_minute") or {}
    provider = figures.get("provider") or {}
    storage = figures.get("storage") or {}
    retries = figures.get("retries") or {}
    return [
        f"  completed           {throughput.get('completed', 0)}"
        f" ({_fmt(throughput.get('per_minute'))} per minute)",
        f"  busiest minute      {_fmt(busiest.get('completed'), ' jobs')} at {_fmt(busiest.get('minute'))}",
        f"  failure rate        {_percent(figures.get('failure_rate'))} of ended jobs",
        f"  queue wait p50/p95  {_pair(figures.get('queue_wait_s'))}",
        f"  processing p50/p95  {_pair(figures.get('processing_s'))}",
        f"  provider p50/p95    {_pair(provider, 'p50_s', 'p95_s')} over {provider.get('calls', 0)} calls,"
        f" errors {_percent(provider.get('error_rate'))}",
        f"  storage success     {_percent(storage.get('success_rate'))},"
        f" upload p95 {_fmt(storage.get('upload_p95_s'), ' s')}",
        f"  retries per job     {_fmt(retries.get('per_job'))} (max {_fmt(retries.get('max'))},"
        f" {retries.get('jobs_retried') or 0} jobs retried)",
    ]


def render_table(figures: dict[str, Any]) -> str:
    stuck = figures.get("stuck") or {}
    lines = [
        f"Jobs created in the last {figures['window_hours']} h: {figures['total']}",
        "",
        "  status       jobs",
        *(f"  {status:<11} {count:>5}" for status, count in sorted(figures["by_status"].items())),
        "",
        *_figure_lines(figures),
        f"  processing, average {_fmt(figures.get('avg_processing_s'), ' s')}",
        f"  expired leases      {stuck.get('expired_leases', 0)}",
        f"  pending > 10 min    {stuck.get('pending_over_10_min', 0)}",
        "",
        *_attempt_lines(figures),
    ]
    lines += _spend_lines(figures.get("spend") or {})
    lines += _token_lines(figures.get("tokens") or {})
    lines += _credit_lines(figures.get("credits") or {})
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


def _token_lines(tokens: dict[str, Any]) -> list[str]:
    """The plug-in's tokens (only where its token tables exist): charged, given back, and the jobs
    whose charge was never found, so were refunded nothing."""
    if not tokens.get("tokens_present"):
        return []
    return [
        "",
        f"  tokens charged      {tokens.get('tokens_charged', 0)} ({tokens.get('jobs_charged', 0)} jobs)",
        f"  tokens refunded     {tokens.get('tokens_refunded', 0)} ({tokens.get('refunds', 0)} jobs)",
        f"  charge not found    {tokens.get('charge_not_found', 0)} jobs (refunded nothing)",
        f"  refunds failed      {tokens.get('refund_failed', 0)}",
    ]


def credits_spent(generations: dict[str, Any], prices: dict[str, float]) -> dict[str, Any]:
    """Paid generations per model (generation_stats: completed jobs, and ids that expired before
    their audio was stored, each paid once more) priced at the configured credits per generation.
    A failure the provider charged for (audio that came back unusable) is not in it."""
    models = {}
    for model, counts in sorted(generations.items()):
        paid = int(counts.get("completed", 0)) + int(counts.get("lost", 0))
        price = prices.get(model)
        credits = None if price is None else round(paid * price, 2)
        models[model] = {**counts, "paid": paid, "credits_each": price, "credits": credits}
    total = sum(m["credits"] or 0 for m in models.values())
    return {"models": models, "total_credits": round(total, 2)}


def _credit_lines(credits: dict[str, Any]) -> list[str]:
    models = credits.get("models") or {}
    if not models:
        return []
    total = _fmt(credits.get("total_credits"))
    lines = ["", f"  credits spent       {total} (MODEL_CREDITS prices each model)"]
    lines += [
        f"  {model:<19} {m['paid']} generations x {_fmt(m['credits_each'])} = {_fmt(m['credits'])}"
        f" ({m.get('lost', 0)} paid again after an id expired)"
        for model, m in models.items()
    ]
    return lines


def fold_settled_hours(store: JobsStore, budget_s: float = FOLD_BUDGET_S) -> str | None:
    """Fold the settled hours the scheduled reclaim has not folded yet, a batch at a time; a note
    when some are left (job_stats() then counts their rows itself: slower, the same answer)."""
    from sona.store.jobs import FOLD_HOURS

    started = time.monotonic()
    try:
        while store.fold_stats(FOLD_HOURS) == FOLD_HOURS:
            if time.monotonic() - started > budget_s:
                return "Some settled hours are not folded yet; the figures count their rows instead."
    except SonaError as exc:
        return f"Settled hours not folded ({exc}); the figures count their rows instead."
    return None
