"""run_job, the private worker: Cloud Tasks' call. It is deployed --no-allow-unauthenticated, so
Cloud Run has already checked the task's OIDC token (audience and run.invoker) before the request
reaches it; it verifies nothing again, and the claim keeps each run exactly-once."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime

from flask import Request, Response
from pydantic import ValidationError

from sona.deadline import Deadline
from sona.doors.http import error, read_json, reply, services_or_error
from sona.errors import DatabaseUnavailable, FfmpegMissing, SonaError, TransientError
from sona.logs import job_context, set_attempt
from sona.models import TaskPayload
from sona.services import Services

log = logging.getLogger(__name__)


def run_job(request: Request) -> Response:
    """Cloud Tasks' call to the private worker: a non-2xx answer makes the queue retry it, so only
    "the job could not even be looked at" answers 5xx; every outcome of the job itself is a 200."""
    started = time.monotonic()
    services = services_or_error()
    if isinstance(services, Response):
        return services
    if request.method != "POST":
        return error(405, "method_not_allowed", f"Use POST, not {request.method}.")
    deadline = Deadline(services.settings.job_budget_s, started=started)
    body = read_json(request)
    if isinstance(body, Response):
        return body
    try:
        task = TaskPayload.model_validate(body)
    except ValidationError:
        return error(422, "invalid_task", 'A task body is {"job_id": "<uuid>"}.')
    with job_context(task.job_id):
        log.info(
            "task %s, earlier deliveries %s",
            request.headers.get("X-CloudTasks-TaskName", "?"),
            request.headers.get("X-CloudTasks-TaskRetryCount", "0"),
        )
    return run_claimed(services, task.job_id, deadline)


def run_claimed(services: Services, job_id: uuid.UUID, deadline: Deadline) -> Response:
    with job_context(job_id):
        try:
            services.look_for_ffmpeg()  # beside the store's set-up (a cold instance's first imports)
            store = services.store
            services.ffmpeg  # noqa: B018  a missing ffmpeg fails here, before anything is claimed
            # One claim id per request: a retried claim whose first answer was lost gets its lease.
            claim_started = time.monotonic()
            with deadline.applies():
                job = store.claim(job_id, uuid.uuid4(), deadline)
            claim_ms = round((time.monotonic() - claim_started) * 1000)
        except DatabaseUnavailable as exc:
            log.error("claim failed: %s", exc)
            return error(
                503,
                "database_unavailable",
                "The job database is unavailable; the job was not touched.",
            )
        except SonaError as exc:
            log.error("claim failed: %s", exc)
            return error(500, "claim_failed", exc.public_message)
        except FfmpegMissing as exc:
            log.error("%s", exc)
            return error(500, "ffmpeg_missing", str(exc))
        if job is None:
            log.info("nothing to claim (duplicate delivery or finished job)")
            return reply(
                200,
                {
                    "job_id": str(job_id),
                    "outcome": "skipped",
                    "reason": "The job is not claimable: it is unknown, already being processed, "
                    "finished, waiting for its retry time, out of attempts, or the service is "
                    "paused.",
                },
            )
        set_attempt(job.attempts)
        log.info("claimed (attempt %d)", job.attempts)
        result = services.pipeline.run(job, deadline, {"claim": claim_ms})
        # A paused job is not rescheduled here: after the pause, reclaim_jobs sends one probe first.
        if result.outcome == "retrying" and services.settings.dispatch == "cloud_tasks":
            _enqueue_retry(services, job_id, result.attempt, result.retry_at)
        status = 503 if result.outcome == "interrupted" else 200
        return reply(status, result.as_json())


def _enqueue_retry(services: Services, job_id: uuid.UUID, attempt: int, when: datetime | None) -> None:
    """A released job's next run is a task scheduled for its backoff; if that fails, reclaim_jobs
    dispatches it once it is due."""
    try:
        services.task_queue.enqueue(job_id, attempt=attempt, not_before=when)
    except TransientError as exc:
        log.warning("could not schedule the retry (reclaim will): %s", exc)
