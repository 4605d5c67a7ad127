"""reclaim_jobs, the scheduler's door: Cloud Scheduler's call with an OIDC token the platform has
checked, or (off Cloud Functions) a caller with the webhook secret."""

from __future__ import annotations

import logging

from flask import Request, Response

from sona.doors.http import error, reply, secret_matches, services_or_error
from sona.errors import DatabaseUnavailable
from sona.logs import on_cloud_functions
from sona.models import SECRET_HEADER
from sona.reclaim import run_reclaim

log = logging.getLogger(__name__)


def reclaim_jobs(request: Request) -> Response:
    """Cloud Scheduler's target: recover lost and stuck jobs, dispatch the due ones."""
    services = services_or_error()
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
    try:
        summary = run_reclaim(services)
    except DatabaseUnavailable as exc:
        log.error("reclaim failed: %s", exc)
        return error(503, "database_unavailable", "The job database is unavailable.")
    # A queue that refuses its listing is a setup fault: the run fails, so Cloud Scheduler shows it.
    return reply(500 if summary.get("queue_refused") else 200, summary)
