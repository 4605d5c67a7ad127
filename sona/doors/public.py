"""process_job, the public door: the database webhook's call, reachable from the internet. It
authenticates the shared secret, validates the payload, enqueues a task and answers 202 (or, with
DISPATCH=direct, runs the job itself through the worker's path)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from flask import Request, Response
from pydantic import ValidationError

from sona.config import Settings
from sona.deadline import Deadline
from sona.doors.http import error, read_json, reply, secret_matches, services_or_error
from sona.doors.worker import run_claimed
from sona.errors import ServiceOutage, TransientError
from sona.logs import job_context
from sona.models import CLAIMABLE, SECRET_HEADER, WebhookPayload
from sona.services import Services

log = logging.getLogger(__name__)


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
    services = services_or_error()
    if isinstance(services, Response):
        return services
    settings = services.settings
    if request.method != "POST":
        return error(405, "method_not_allowed", f"Use POST, not {request.method}.")
    if not secret_matches(request, settings):
        return error(401, "unauthorized", f"Missing or wrong {SECRET_HEADER} header.")
    body = read_json(request)
    if isinstance(body, Response):
        return body
    payload = parse_payload(body, settings)
    if isinstance(payload, Response):
        return payload
    if settings.dispatch == "direct":
        return run_claimed(services, payload.record.id, Deadline(settings.job_budget_s, started=started))
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
