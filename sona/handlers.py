"""The two HTTP entry points' request handling: authenticate, parse, then hand over to the work."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any

from flask import Request, Response
from pydantic import ValidationError

from sona.config import ConfigError, Settings
from sona.deadline import Deadline
from sona.errors import DatabaseUnavailable, FfmpegMissing, SonaError
from sona.logs import job_context, on_cloud_functions, set_attempt
from sona.models import CLAIMABLE, WebhookPayload
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
    """Webhook on INSERT into jobs: claim the row once, run the pipeline, report the outcome."""
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
    deadline = Deadline(settings.job_budget_s, started=started)
    return _run_job(services, payload.record.id, deadline)


def _run_job(services: Services, job_id: uuid.UUID, deadline: Deadline) -> Response:
    with job_context(job_id):
        try:
            services.ffmpeg  # noqa: B018  a missing ffmpeg fails here, before anything is claimed
            # One claim id per request: a retried claim whose first answer was lost gets its lease.
            with deadline.applies():
                job = services.store.claim(job_id, uuid.uuid4(), deadline)
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
                    "finished, waiting for its retry time, or out of attempts.",
                },
            )
        set_attempt(job.attempts)
        log.info("claimed (attempt %d)", job.attempts)
        result = services.pipeline.run(job, deadline)
        status = 503 if result.outcome == "interrupted" else 200
        return reply(status, result.as_json())


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
    from sona.reclaim import run_reclaim

    try:
        summary = run_reclaim(services)
    except DatabaseUnavailable as exc:
        log.error("reclaim failed: %s", exc)
        return error(503, "database_unavailable", "The job database is unavailable.")
    return reply(200, summary)
