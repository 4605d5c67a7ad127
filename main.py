"""Cloud Functions entry points. The work lives in sona/; this file only names the targets.

Each deployed function runs one target, so each imports only its own door, on its first request:
the scheduler's door brings the reclaim and requests, which a webhook's or a task's cold start
would otherwise pay for before answering (PERFORMANCE.md, cold start)."""

import functions_framework
from flask import Request, Response


@functions_framework.http
def process_job(request: Request) -> Response:
    """Database webhook on INSERT into jobs (public): enqueue, or run in direct mode."""
    from sona.doors import public

    return public.process_job(request)


@functions_framework.http
def run_job(request: Request) -> Response:
    """Cloud Tasks, with an OIDC token Cloud Run has checked (private): run one job."""
    from sona.doors import worker

    return worker.run_job(request)


@functions_framework.http
def reclaim_jobs(request: Request) -> Response:
    """Cloud Scheduler: recover crashed, timed-out and lost jobs."""
    from sona.doors import scheduler

    return scheduler.reclaim_jobs(request)
