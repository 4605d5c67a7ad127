"""The dispatch benchmark: both modes side by side on the whole local stack (pg_net-like relay,
Cloud Run capacity cap, local Cloud Tasks, Stable Audio double under its rate limit).

- burst: many jobs inserted in one statement against 20 slots (10 instances x 2) and a provider that
  takes 2 s a generation: time to drain against the ideal (capacity- or rate-bound, whichever binds),
  insert-to-completed p50/p95, provider 429s, jobs lost, failed and paid twice. Cloud Scheduler's
  reclaim runs every RECLAIM_EVERY_S (2 minutes in production, scaled down here like the grace).
- steady: jobs inserted 1 s apart with 10 s generations and capacity to spare: insert-to-start.
- webhook answer time, warm: what pg_net waits for per delivery.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import requests

from devstack.doubles.stable_audio_double import RateLimit
from devstack.stack import LocalStack

MODES = ("cloud_tasks", "direct")
RECLAIM_EVERY_S = 10.0


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stack(root: Path, mode: str, path: str, **extra: str) -> LocalStack:
    env = {
        "DISPATCH": mode,
        "LOG_LEVEL": "warning",
        "JOB_TIMEOUT_MS": "60000",
        "MAX_CONCURRENT_JOBS": "2",
        "PROVIDER_RATE_PER_S": "15",
        "RECLAIM_GRACE_S": "5",
        "RETRY_DELAY_MS": "500",
        **extra,
    }
    return LocalStack(root, env=env, process_env={"PATH": path}, capacity=(10, 2))


def _insert_burst(stack: LocalStack, count: int) -> None:
    user = stack.create_user()
    with stack.postgres_connection() as conn:
        conn.execute(
            "insert into jobs (user_id, prompt, duration, quality)"
            " select %s, 'burst ' || g, 1, 'low' from generate_series(1, %s) g",
            (user, count),
        )


def _reclaim(stack: LocalStack) -> None:
    with contextlib.suppress(requests.RequestException):  # a failed call is retried on the next tick
        requests.post(stack.reclaim_jobs_url, headers={"X-Webhook-Secret": stack.webhook_secret}, timeout=120)


def _rows(stack: LocalStack) -> list[dict[str, Any]]:
    with stack.postgres_connection() as conn:
        cur = conn.execute(
            "select status, extract(epoch from created_at) as created,"
            " extract(epoch from started_at) as started, extract(epoch from completed_at) as completed"
            " from jobs"
        )
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _drain(stack: LocalStack, limit_s: float) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    next_reclaim = started + RECLAIM_EVERY_S
    while True:
        rows = _rows(stack)
        if all(r["status"] in ("completed", "failed") for r in rows):
            return rows, time.monotonic() - started
        if time.monotonic() - started > limit_s:
            return rows, time.monotonic() - started
        if time.monotonic() >= next_reclaim:
            _reclaim(stack)
            next_reclaim = time.monotonic() + RECLAIM_EVERY_S
        time.sleep(0.25)


def burst(work: Path, mode: str, path: str, jobs: int, latency_s: float = 2.0) -> dict[str, Any]:
    slots, rate = 20, 15.0
    ideal = max(jobs / slots * latency_s, jobs / rate)
    with _stack(work / f"burst-{mode}", mode, path, THREADS=str(slots)) as stack:
        assert stack.double is not None and stack.cap is not None
        stack.double.latency_s = latency_s
        stack.double.rate_limit = RateLimit(requests=150, window_s=10, lockout_s=60)
        _insert_burst(stack, jobs)
        rows, _ = _drain(stack, limit_s=3 * ideal + 60)
        done = [r for r in rows if r["status"] == "completed"]
        ends = [float(r["completed"]) for r in rows if r["completed"] is not None]
        first = min(float(r["created"]) for r in rows)
        drain_s = (max(ends) - first) if len(done) == len(rows) else float("nan")
        waits = [float(r["completed"]) - float(r["created"]) for r in done]
        return {
            "mode": mode,
            "jobs": jobs,
            "drain_s": round(drain_s, 2),
            "ideal_s": round(ideal, 2),
            "ratio": round(drain_s / ideal, 3),
            "insert_to_completed_p50_s": round(_p(waits, 0.5), 2),
            "insert_to_completed_p95_s": round(_p(waits, 0.95), 2),
            "provider_429s": stack.double.rate_limited,
            "cloud_run_429s": stack.cap.rejected,
            "lost": sum(1 for r in rows if r["status"] not in ("completed", "failed")),
            "failed": sum(1 for r in rows if r["status"] == "failed"),
            "paid_twice": max(0, stack.double.paid_generations - len(done)),
        }


def steady(work: Path, mode: str, path: str, jobs: int = 30, latency_s: float = 10.0) -> dict[str, Any]:
    with _stack(work / f"steady-{mode}", mode, path, THREADS="20") as stack:
        assert stack.double is not None
        stack.double.latency_s = latency_s
        for i in range(jobs):
            # A musician each: one user's jobs in flight are capped by the quota (3 by default).
            stack.insert_job(f"steady {i}", duration=1, quality="low")
            time.sleep(1.0)
        rows, _ = _drain(stack, limit_s=jobs * latency_s + 120)
        waits = [float(r["started"]) - float(r["created"]) for r in rows if r["started"] is not None]
        return {
            "mode": mode,
            "jobs": jobs,
            "insert_to_start_p50_s": round(_p(waits, 0.5), 3),
            "insert_to_start_p95_s": round(_p(waits, 0.95), 3),
            "insert_to_start_max_s": round(max(waits), 3),
        }


def webhook_answer(work: Path, mode: str, path: str, count: int = 100) -> dict[str, Any]:
    """Warm webhook deliveries one after another, timed by the caller as pg_net would wait."""
    with _stack(work / f"webhook-{mode}", mode, path) as stack:
        assert stack.relay is not None
        stack.relay.enabled = False
        headers = {"X-Webhook-Secret": stack.webhook_secret}
        times = []
        for i in range(count + 5):
            job_id = stack.insert_job(f"webhook {i}", duration=1, quality="low")
            body = {"type": "INSERT", "table": "jobs", "schema": "public", "record": {"id": str(job_id)}}
            started = time.perf_counter()
            requests.post(stack.process_job_url, json=body, headers=headers, timeout=120)
            if i >= 5:  # the first few warm the instance
                times.append(time.perf_counter() - started)
        return {
            "mode": mode,
            "p50_s": round(statistics.median(times), 4),
            "p95_s": round(_p(times, 0.95), 4),
        }


def run(work: Path, path: str, burst_jobs: int) -> dict[str, Any]:
    return {
        "burst": [burst(work, mode, path, burst_jobs) for mode in MODES],
        "steady": [steady(work, mode, path) for mode in MODES],
        "webhook_answer": [webhook_answer(work, mode, path) for mode in MODES],
    }


def table(report: dict[str, Any]) -> str:
    lines = ["", "dispatch: cloud_tasks vs direct", "-" * 108]
    for b in report["burst"]:
        lines.append(
            f"burst {b['jobs']} jobs, 20 slots, 2 s [{b['mode']:<11}] drain {b['drain_s']} s"
            f" (ideal {b['ideal_s']} s, {b['ratio']}x), insert-to-completed p50/p95"
            f" {b['insert_to_completed_p50_s']}/{b['insert_to_completed_p95_s']} s, provider 429s"
            f" {b['provider_429s']}, Cloud Run 429s {b['cloud_run_429s']}, lost {b['lost']}, failed"
            f" {b['failed']}, paid twice {b['paid_twice']}"
        )
    for s in report["steady"]:
        lines.append(
            f"steady {s['jobs']} x 1 s apart, 10 s   [{s['mode']:<11}] insert-to-start p50/p95/max"
            f" {s['insert_to_start_p50_s']}/{s['insert_to_start_p95_s']}/{s['insert_to_start_max_s']} s"
        )
    for w in report["webhook_answer"]:
        lines.append(f"webhook answer, warm [{w['mode']:<11}] p50/p95 {w['p50_s']}/{w['p95_s']} s")
    return "\n".join(lines)
