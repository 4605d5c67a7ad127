"""Cloud Functions entry points. The work lives in sona/; this file only names the targets.

Each deployed function runs one target, so each imports only its own door, on its first request:
the scheduler's door brings the reclaim and requests, which a webhook's or a task's cold start
would otherwise pay for before answering (PERFORMANCE.md, cold start)."""

import os

import functions_framework
from flask import Request, Response

# The functions use no pydantic plugin. Unless told so, pydantic looks for plugins when it builds its
# first model, reading the entry points of every installed package: 5 to 10 ms of each cold start's
# first answer (Pydantic, "Plugins": PYDANTIC_DISABLE_PLUGINS). A value set in the environment wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


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
