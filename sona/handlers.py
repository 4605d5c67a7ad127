"""The HTTP entry points' request handling: authenticate, parse, then hand over to the work.

- process_job, the public door: the database webhook's call. It authenticates the shared secret,
  validates the payload, enqueues a task and answers 202 (or, with DISPATCH=direct, runs the job).
- run_job, the private worker: Cloud Tasks' call. It is deployed --no-allow-unauthenticated, so
  Cloud Run has already checked the task's OIDC token (audience and run.invoker) before the request
  reaches it; it verifies nothing again, and the claim keeps each run exactly-once.
- reclaim_jobs: Cloud Scheduler's call (OIDC too), or a caller with the webhook secret.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from datetime import datetime
from typing import Any

from flask import Request, Response
from pydantic import ValidationError

from sona.config import ConfigError, Settings
from sona.deadline import Deadline
from sona.errors import DatabaseUnavailable, FfmpegMissing, ServiceOutage, SonaError, TransientError
from sona.logs import job_context, on_cloud_functions, set_attempt
from sona.models import CLAIMABLE, TaskPayload, WebhookPayload
from sona.services import Services, get_services

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000
SECRET_HEADER = "X-Webhook-Secret"  # noqa: S105  a header name, not a secret


def reply(status: int, body: dict[str, Any]) -> Response:
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    if status == 405:
        response.headers["Allow"] = "POST"
    return response


def error(status: int, code: str, message: str, **extra: Any) -> Response:
    return reply(status, {"error": code, "message": message, **extra})


def secret_matches(request: Request, settings: Settings) -> bool:
    given = request.headers.get(SECRET_HEADER, "").encode()
    expected = settings.webhook_secret.get_secret_value().encode()
    return hmac.compare_digest(given, expected)  # constant time, whatever the length


def _services_or_error() -> Services | Response:
    try:
        return get_services()
    except ConfigError as exc:
        log.error("%s", exc)
        return error(500, "misconfigured", "The function is misconfigured; see its logs.")


def _parse_json(request: Request) -> Any | Response:
    """The body as JSON, read no further than the size limit (a chunked body has no length)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return error(413, "payload_too_large", f"The body is over {MAX_BODY_BYTES} bytes.")
    if request.mimetype != "application/json":
        return error(
            415,
            "unsupported_media_type",
            "Send the webhook payload as Content-Type: application/json.",
        )
    raw = request.stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        return error(413, "payload_too_large", f"The body is over {MAX_BODY_BYTES} bytes.")
    if not raw:
        return error(400, "invalid_json", "The body is empty; send the webhook payload as JSON.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return error(400, "invalid_json", f"The body is not valid JSON: {exc}")


def parse_payload(body: Any, settings: Settings) -> WebhookPayload | Response:
    if not isinstance(body, dict):
        return error(422, "invalid_payload", "The payload must be a JSON object.")
    try:
        payload = WebhookPayload.model_validate(body)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        return error(422, "invalid_payload", "The webhook payload is not valid.", problems=problems)
    if (payload.schema_, payload.table) != (settings.jobs_schema, settings.jobs_table):
        return error(
            422,
            "wrong_table",
            f"This function handles {settings.jobs_schema}.{settings.jobs_table}, "
            f"not {payload.schema_}.{payload.table}.",
        )
    if payload.type == "UPDATE" and payload.record.status not in CLAIMABLE:
        return error(
            422,
            "not_claimable",
            f"An UPDATE is handled only when the new status is pending or queued, "
            f"not {payload.record.status!r}.",
        )
    return payload


def process_job(request: Request) -> Response:
    """The database webhook: enqueue the job (or, in direct mode, run it)."""
    started = time.monotonic()  # the job's budget counts from the request's arrival
    services = _services_or_error()
    if isinstance(services, Response):
        return services
    settings = services.settings
    if request.method != "POST":
        return error(405, "method_not_allowed", f"Use POST, not {request.method}.")
    if not secret_matches(request, settings):
        return error(401, "unauthorized", f"Missing or wrong {SECRET_HEADER} header.")
    body = _parse_json(request)
    if isinstance(body, Response):
        return body
    payload = parse_payload(body, settings)
    if isinstance(payload, Response):
        return payload
    if settings.dispatch == "direct":
        return _run_job(services, payload.record.id, Deadline(settings.job_budget_s, started=started))
    return _enqueue(services, payload.record.id, payload.record.attempts)


def _enqueue(services: Services, job_id: uuid.UUID, attempts: int) -> Response:
    """The webhook's whole work in cloud_tasks mode: one task, then answer at once, so pg_net's
    batch never waits on a job. A lost enqueue is a lost webhook: reclaim_jobs covers it."""
    with job_context(job_id):
        try:
            name, created = services.task_queue.enqueue(job_id, attempt=attempts)
        except ServiceOutage as exc:
            log.error("enqueue failed: %s", exc)
            return error(500, "queue_misconfigured", exc.public_message)
        except TransientError as exc:
            log.warning("enqueue failed: %s", exc)
            return error(503, "queue_unavailable", exc.public_message)
        log.info("task %s (%s)", name.rsplit("/", 1)[-1], created)
        outcome = "enqueued" if created == "created" else "already_enqueued"
        return reply(202, {"job_id": str(job_id), "outcome": outcome, "task": name})


def run_job(request: Request) -> Response:
    """Cloud Tasks' call to the private worker: a non-2xx answer makes the queue retry it, so only
    "the job could not even be looked at" answers 5xx; every outcome of the job itself is a 200."""
    started = time.monotonic()
    services = _services_or_error()
    if isinstance(services, Response):
        return services
    if request.method != "POST":
        return error(405, "method_not_allowed", f"Use POST, not {request.method}.")
    deadline = Deadline(services.settings.job_budget_s, started=started)
    body = _parse_json(request)
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
    return _run_job(services, task.job_id, deadline)


def _run_job(services: Services, job_id: uuid.UUID, deadline: Deadline) -> Response:
    with job_context(job_id):
        try:
            services.ffmpeg  # noqa: B018  a missing ffmpeg fails here, before anything is claimed
            # One claim id per request: a retried claim whose first answer was lost gets its lease.
            claim_started = time.monotonic()
            with deadline.applies():
                job = services.store.claim(job_id, uuid.uuid4(), deadline)
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


def reclaim_jobs(request: Request) -> Response:
    """Cloud Scheduler's target: recover lost and stuck jobs, dispatch the due ones."""
    services = _services_or_error()
    if isinstance(services, Response):
        return services
    if request.method not in ("POST", "GET"):
        return error(405, "method_not_allowed", f"Use POST, not {request.method}.")
    has_secret = SECRET_HEADER in request.headers
    if has_secret and not secret_matches(request, services.settings):
        return error(401, "unauthorized", f"Wrong {SECRET_HEADER} header.")
    if not has_secret and not on_cloud_functions():
        # On Cloud Functions the platform has already checked the caller's OIDC token.
        return error(401, "unauthorized", f"Missing {SECRET_HEADER} header.")
    from sona.job.reclaim import run_reclaim

    try:
        summary = run_reclaim(services)
    except DatabaseUnavailable as exc:
        log.error("reclaim failed: %s", exc)
        return error(503, "database_unavailable", "The job database is unavailable.")
    # A queue that refuses its listing is a setup fault: the run fails, so Cloud Scheduler shows it.
    return reply(500 if summary.get("queue_refused") else 200, summary)
