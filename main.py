"""Cloud Functions entry points. The work lives in sona/; this file only names the targets."""

import functions_framework
from flask import Request, Response

from sona.doors import public, scheduler, worker


@functions_framework.http
def process_job(request: Request) -> Response:
    """Database webhook on INSERT into jobs (public): enqueue, or run in direct mode."""
    return public.process_job(request)


@functions_framework.http
def run_job(request: Request) -> Response:
    """Cloud Tasks, with an OIDC token Cloud Run has checked (private): run one job."""
    return worker.run_job(request)


@functions_framework.http
def reclaim_jobs(request: Request) -> Response:
    """Cloud Scheduler: recover crashed, timed-out and lost jobs."""
    return scheduler.reclaim_jobs(request)
