"""reclaim_jobs: expire lost leases in SQL, then dispatch every due job: as a Cloud Tasks task
(cloud_tasks mode: thousands per call, no connection held), or to process_job over HTTP (direct)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from sona.deadline import Deadline
from sona.errors import ServiceOutage, SonaError, TransientError
from sona.models import SECRET_HEADER, webhook_payload
from sona.services import Services
from sona.store.jobs import DueJob
from sona.task_queue import PooledHttp, TaskQueue

log = logging.getLogger(__name__)

# Do not start a dispatch with less than this left: it would be cut off at once.
MIN_DISPATCH_S = 2.0
# Task creations in flight at once: a 10,000-job backlog is a few seconds of API calls.
ENQUEUE_CONCURRENCY = 32
# Object names deleted per Storage call.
GARBAGE_BATCH = 100


def run_reclaim(services: Services) -> dict[str, Any]:
    settings = services.settings
    deadline = Deadline(settings.reclaim_budget_s)
    reclaimed = services.store.reclaim()
    due = reclaimed.dispatch
    summary: dict[str, Any] = {
        "reclaimed": reclaimed.released,
        "failed": reclaimed.failed,
        "due": len(due),
        "dispatched": 0,
        "completed": 0,
        "job_failed": 0,
        "retrying": 0,
        "skipped": 0,
        "still_running": 0,
        "paused": 0,
        "cancelled": 0,
        "errors": 0,
        "queue_refused": 0,
    }
    if due and settings.dispatch == "cloud_tasks":
        summary.update(_enqueue_all(due, services, deadline))
    elif due and not settings.process_job_url:
        log.error("%d jobs are due but PROCESS_JOB_URL is not set", len(due))
        summary["errors"] = len(due)
    elif due:
        outcomes = _dispatch_all([str(a.job_id) for a in due], services, deadline)
        summary["dispatched"] = len(outcomes)
        for outcome in outcomes:
            key = {
                "completed": "completed",
                "failed": "job_failed",
                "retrying": "retrying",
                "skipped": "skipped",
                "running": "still_running",
                "paused": "paused",
                "cancelled": "cancelled",
            }.get(outcome, "errors")
            summary[key] += 1
    summary["files_deleted"] = _delete_expired_files(services, deadline)
    summary["stats_hours_folded"] = _fold_stats(services, deadline)
    summary["elapsed_ms"] = round(deadline.elapsed() * 1000)
    log.info("reclaim: %s", summary)
    return summary


def _fold_stats(services: Services, deadline: Deadline) -> int:
    """Count the hours that settled since the last run once, for job_stats(), within what is left of
    the run's budget; a failure or a skip only makes job_stats() count those hours' rows itself
    until a later run folds them."""
    if deadline.remaining() < MIN_DISPATCH_S:
        return 0
    try:
        with deadline.applies():
            return services.store.fold_stats()
    except SonaError as exc:
        log.warning("job_stats hours not folded yet: %s", exc)
        return 0


def _delete_expired_files(services: Services, deadline: Deadline) -> int:
    """Delete the files whose jobs let them go (each user's newest outputs are kept, the plug-in's
    daily cleanup cleared the rest, or the row was deleted), peaks included; a name is forgotten only
    once Storage has deleted it, so a failed call is tried again by the next reclaim."""
    deleted = 0
    while deadline.remaining() > MIN_DISPATCH_S:
        batch = services.store.files_to_delete(GARBAGE_BATCH)
        if not batch:
            break
        try:
            with deadline.applies():
                services.storage.remove([g.name for g in batch])
        except SonaError as exc:  # Storage away or refusing: the names wait for the next run
            log.warning("expired files not deleted yet: %s", exc)
            break
        deleted += services.store.files_deleted([g.id for g in batch])
        if len(batch) < GARBAGE_BATCH:
            break
    return deleted


def _enqueue_all(due: list[DueJob], services: Services, deadline: Deadline) -> dict[str, int]:
    """One task per due job whose task is gone, many creates at once over kept-alive connections.

    A job still pending may well have its task in the queue: created by the webhook, or by an earlier
    reclaim, and waiting its turn in a backlog, its schedule or its retries. A task of a new round
    has a new name, which de-duplication cannot catch, so sending one anyway would add a task per
    waiting job at every reclaim. The jobs with a task are listed first and left alone. If the queue
    cannot be listed, nothing is sent this round, for the same reason. A refused listing (403: the
    account lacks cloudtasks.tasks.list) is a setup fault that fails the run, so Cloud Scheduler
    records it; a passing fault waits for the next run. A job whose task could not be created keeps
    its dispatched_at and goes out again after the grace period."""
    http = PooledHttp(ENQUEUE_CONCURRENCY)
    queue = TaskQueue(services.settings, http)
    try:
        waiting = queue.jobs_with_a_task(timeout_s=min(30.0, deadline.remaining()))
    except ServiceOutage as exc:
        http.close()
        log.error("the queue refused its listing, so no job was dispatched: %s", exc)
        return {"errors": len(due), "queue_refused": 1}
    except TransientError as exc:
        http.close()
        log.warning("could not list the queue; the next reclaim dispatches: %s", exc)
        return {"errors": len(due)}
    still_queued = [a for a in due if a.job_id in waiting]
    due = [a for a in due if a.job_id not in waiting]

    def enqueue(job: DueJob) -> str:
        left = deadline.remaining()
        if left < MIN_DISPATCH_S:
            return "not_started"
        try:
            _, created = queue.enqueue(
                job.job_id,
                attempt=job.attempt,
                dispatch_round=job.dispatch_round,
                timeout_s=min(10.0, left),
            )
        except TransientError as exc:  # ServiceOutage included: counted, logged once below
            log.warning("enqueue of %s failed: %s", job.job_id, exc)
            return "error"
        return created

    try:
        with ThreadPoolExecutor(ENQUEUE_CONCURRENCY, thread_name_prefix="enqueue") as pool:
            outcomes = Counter(pool.map(enqueue, due))
    finally:
        http.close()  # a warm instance runs reclaim again: its connections must not pile up
    return {
        "dispatched": outcomes["created"] + outcomes["exists"],
        "already_enqueued": outcomes["exists"],
        "still_queued": len(still_queued),
        "errors": outcomes["error"] + outcomes["not_started"],
    }


def _dispatch_all(job_ids: list[str], services: Services, deadline: Deadline) -> list[str]:
    settings = services.settings
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=settings.reclaim_concurrency)
    session.mount("http://", adapter)
    session.mount("https://", adapter)

    def dispatch(job_id: str) -> str:
        left = deadline.remaining()
        if left < MIN_DISPATCH_S:
            return "not_started"
        # An UPDATE to a claimable status: the same shape as the webhook's.
        payload = webhook_payload(
            job_id, kind="UPDATE", schema=settings.jobs_schema, table=settings.jobs_table
        )
        headers = {SECRET_HEADER: settings.webhook_secret.get_secret_value()}
        try:
            # Held open for the whole job: on Cloud Run an invocation has CPU only while its
            # request is in flight.
            response = session.post(
                str(settings.process_job_url), json=payload, headers=headers, timeout=(5, left)
            )
        except requests.Timeout:
            return "running"
        except requests.RequestException as exc:
            log.warning("dispatch of %s failed: %s", job_id, type(exc).__name__)
            return "error"
        try:
            return str(response.json().get("outcome", "error"))
        except ValueError:
            return "error"

    started = time.monotonic()
    with ThreadPoolExecutor(settings.reclaim_concurrency, thread_name_prefix="dispatch") as pool:
        outcomes = list(pool.map(dispatch, job_ids))
    log.info("dispatched %d jobs in %.1f s", len(job_ids), time.monotonic() - started)
    return [o for o in outcomes if o != "not_started"]
