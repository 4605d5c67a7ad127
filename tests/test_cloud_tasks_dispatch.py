"""Dispatch through Cloud Tasks, through real processes: the webhook only enqueues, a task runs the
job on the private worker (its OIDC token checked by the local Cloud Run front, and nothing runs
without one), no job waits behind another, a burst drains with nothing lost or paid twice, and
reclaim turns a backlog into tasks in one call."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour, RateLimit
from devstack.emulators.cloud_tasks import mint_oidc_token
from devstack.events import WaitTimedOut
from devstack.stack import TASKS_ACCOUNT, LocalStack
from tests.support import RELAY_PAUSE_S, no_job_where, sql

pytestmark = pytest.mark.slow

SLOTS = 2 * 2  # the stack's capacity (2, 2) below: what may run at once
DIRECT_BATCH = 50  # reclaim's batch under direct dispatch (sona/config.py); Cloud Tasks' is 10,000
ENV = {"RETRY_DELAY_MS": "200", "RECLAIM_GRACE_S": "60", "MAX_ATTEMPTS": "3", "PROVIDER_RATE_PER_S": "15"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    # 2 instances x 2 jobs: the Cloud Run cap answers 429 past that, as at max instances.
    with LocalStack(
        tmp_path_factory.mktemp("tasks"),
        env=ENV,
        process_env={"PATH": "/usr/bin:/bin"},
        capacity=(2, 2),
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
    ) as s:
        yield s


@pytest.fixture(autouse=True)
def fresh(stack: LocalStack) -> None:
    assert stack.double is not None and stack.relay is not None and stack.tasks is not None
    assert stack.tasks.wait_idle(60)
    stack.double.reset()
    stack.double.rate_limit = None
    stack.double.latency_s = 0.0
    stack.relay.wait_idle()  # an earlier test's dropped deliveries are dropped by now
    stack.relay.enabled = True
    sql(stack.database_url, "delete from jobs", role=None)


def insert_many(stack: LocalStack, count: int, duration: int = 1) -> list[uuid.UUID]:
    """One INSERT statement of many rows, as a burst from many musicians would arrive."""
    user = stack.create_user()
    rows = sql(
        stack.database_url,
        "insert into jobs (user_id, prompt, duration, quality)"
        " select %s, 'burst ' || g, %s, 'low' from generate_series(1, %s) g returning id",
        user,
        duration,
        count,
        role=None,
    )
    return [uuid.UUID(str(r["id"])) for r in rows]


def wait_all(stack: LocalStack, timeout_s: float) -> list[dict[str, Any]]:
    # One boolean per look: `select *` of the backlog's 54 rows at each look was 5 CPU-s of this file.
    def ended() -> bool:
        return no_job_where(stack.database_url, "status not in ('completed', 'failed')")

    with contextlib.suppress(WaitTimedOut):  # then the rows as they are: the caller's assert says
        stack.wait_until(ended, timeout_s, "every job to end")
    return sql(stack.database_url, "select * from jobs", role=None)


def test_the_webhook_answers_202_once_the_task_exists(stack: LocalStack) -> None:
    assert stack.relay is not None and stack.tasks is not None
    stack.relay.enabled = False  # deliver by hand, to read the answer
    job_id = stack.insert_job("enqueue only", duration=1)
    body = {"type": "INSERT", "table": "jobs", "schema": "public", "record": {"id": str(job_id)}}
    headers = {"X-Webhook-Secret": stack.webhook_secret, "Content-Type": "application/json"}
    first = requests.post(stack.process_job_url, data=json.dumps(body), headers=headers, timeout=10)
    again = requests.post(stack.process_job_url, data=json.dumps(body), headers=headers, timeout=10)
    assert (first.status_code, first.json()["outcome"]) == (202, "enqueued")
    assert (again.status_code, again.json()["outcome"]) == (202, "already_enqueued")
    assert first.json()["task"] == again.json()["task"]
    assert stack.wait_for(job_id, timeout_s=30)["status"] == "completed"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


CALLERS = {
    "no token": (lambda stack: {}, 401),
    "not a token": (lambda stack: bearer("not-a-jwt"), 401),
    "signed by someone else": (
        lambda stack: bearer(mint_oidc_token(b"another key", TASKS_ACCOUNT, stack.run_job_url)),
        401,
    ),
    "for another service": (
        lambda stack: bearer(mint_oidc_token(stack.oidc_key, TASKS_ACCOUNT, stack.process_job_url)),
        401,
    ),
    "expired": (
        lambda stack: bearer(
            mint_oidc_token(stack.oidc_key, TASKS_ACCOUNT, stack.run_job_url, now=time.time() - 7200)
        ),
        401,
    ),
    "an account without run.invoker": (
        lambda stack: bearer(mint_oidc_token(stack.oidc_key, "someone@example.com", stack.run_job_url)),
        403,
    ),
}


@pytest.mark.parametrize("caller", CALLERS, ids=list(CALLERS))
def test_the_private_worker_refuses_a_call_without_a_valid_token_before_any_job_code_runs(
    stack: LocalStack, caller: str
) -> None:
    assert stack.relay is not None and stack.double is not None and stack.worker_front is not None
    stack.relay.enabled = False
    job_id = stack.insert_job("not yours to run", duration=1)
    headers, status = CALLERS[caller]
    response = requests.post(
        stack.run_job_url, json={"job_id": str(job_id)}, headers=headers(stack), timeout=10
    )
    assert response.status_code == status
    assert stack.worker_front.refused[-1] == status
    assert str(job_id) not in stack.functions["run_job"].output()  # the function never saw it
    assert stack.job(job_id)["status"] == "pending"
    assert stack.double.call_count == 0


def test_a_call_with_the_tasks_token_reaches_the_worker_and_runs_the_job(stack: LocalStack) -> None:
    assert stack.relay is not None
    stack.relay.enabled = False
    job_id = stack.insert_job("run by hand", duration=1)
    token = mint_oidc_token(stack.oidc_key, TASKS_ACCOUNT, stack.run_job_url)
    response = requests.post(
        stack.run_job_url, json={"job_id": str(job_id)}, headers=bearer(token), timeout=60
    )
    assert (response.status_code, response.json()["outcome"]) == (200, "completed")


def test_a_job_inserted_while_another_is_generating_starts_without_waiting(stack: LocalStack) -> None:
    assert stack.double is not None
    stack.double.script(Behaviour("slow", delay_s=8))  # the first job's generation takes 8 s
    slow = stack.insert_job("a long one", duration=1)
    assert stack.wait_for(slow, ("processing",), timeout_s=10)["status"] == "processing"
    quick = stack.insert_job("a quick one", duration=1)
    row = stack.wait_for(quick, timeout_s=20)
    assert row["status"] == "completed"
    assert stack.job(slow)["status"] == "processing"  # still generating: the quick one did not wait
    assert (row["started_at"] - row["created_at"]).total_seconds() < 3
    assert stack.wait_for(slow, timeout_s=30)["status"] == "completed"


def test_a_burst_drains_at_capacity_with_nothing_lost_or_paid_twice(stack: LocalStack) -> None:
    assert stack.double is not None and stack.cap is not None and stack.tasks is not None
    stack.double.latency_s = 0.3
    stack.double.rate_limit = RateLimit(requests=150, window_s=10, lockout_s=60)
    rejected_before = stack.cap.rejected
    jobs = insert_many(stack, 6 * SLOTS)  # six times what may run at once
    rows = wait_all(stack, timeout_s=120)
    assert sorted(r["status"] for r in rows) == ["completed"] * len(jobs)
    assert stack.double.paid_generations == len(jobs)  # each job paid exactly once
    assert stack.double.rate_limited == 0  # the queue's rate kept the provider happy
    assert stack.tasks.max_in_flight("sona-jobs") <= SLOTS  # never more than the function's slots
    assert stack.cap.rejected == rejected_before  # so Cloud Run never had to refuse one


def test_a_released_job_is_retried_by_a_scheduled_task_without_reclaim(stack: LocalStack) -> None:
    assert stack.double is not None
    stack.double.script(
        Behaviour("error", 500), Behaviour("error", 500), Behaviour("error", 500), Behaviour("error", 500)
    )  # the first attempt's call and all its retries
    job_id = stack.insert_job("second time lucky", duration=1)
    row = stack.wait_for(job_id, timeout_s=60)
    assert row["status"] == "completed", row["error_message"]
    assert row["attempts"] == 2


def test_reclaim_turns_a_backlog_of_lost_webhooks_into_tasks_in_one_call(stack: LocalStack) -> None:
    assert stack.relay is not None and stack.double is not None
    stack.relay.enabled = False  # every webhook lost
    jobs = insert_many(stack, DIRECT_BATCH + SLOTS)  # more than direct dispatch's batch of 50
    sql(stack.database_url, "update jobs set created_at = now() - interval '1 hour'", role=None)
    response = requests.post(
        stack.reclaim_jobs_url, headers={"X-Webhook-Secret": stack.webhook_secret}, timeout=60
    )
    assert response.status_code == 200, response.text
    summary = response.json()
    assert (summary["due"], summary["dispatched"], summary["errors"]) == (len(jobs), len(jobs), 0)
    rows = wait_all(stack, timeout_s=120)
    assert sorted(r["status"] for r in rows) == ["completed"] * len(jobs)
    assert stack.double.paid_generations == len(jobs)
