"""Protecting the spend through real processes (gateway, relay, Cloud Tasks or direct dispatch, both
functions under functions-framework, the Stable Audio double): an account-level outage storm pauses
the service with nothing failed and no attempt used, a probe resumes it; a cancelled job is never
paid for before its generation and never written after it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour
from devstack.stack import LocalStack
from tests.support import RELAY_PAUSE_S, no_job_where, sql, wait_until

pytestmark = pytest.mark.slow

JOBS = 8


@pytest.fixture(scope="module", params=["cloud_tasks", "direct"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_server: str
) -> Iterator[LocalStack]:
    env = {"DISPATCH": request.param, "RETRY_DELAY_MS": "50", "RECLAIM_GRACE_S": "0", "MAX_ATTEMPTS": "3"}
    with LocalStack(
        tmp_path_factory.mktemp(f"spend-{request.param}"),
        env=env,
        process_env={"PATH": "/usr/bin:/bin"},
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
    ) as s:
        yield s


@pytest.fixture(autouse=True)
def fresh(stack: LocalStack) -> None:
    assert stack.double is not None and stack.relay is not None
    if stack.tasks is not None:
        assert stack.tasks.wait_idle(60)
    stack.double.reset()
    stack.relay.wait_idle()
    stack.relay.enabled = True
    sql(stack.database_url, "delete from jobs; delete from sona_pauses", role=None)


def reclaim(stack: LocalStack) -> dict[str, Any]:
    answer = requests.post(
        stack.reclaim_jobs_url, headers={"X-Webhook-Secret": stack.webhook_secret}, timeout=120
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def rows(stack: LocalStack) -> list[dict[str, Any]]:
    return sql(stack.database_url, "select * from jobs order by created_at", role=None)


def settle(stack: LocalStack) -> None:
    """Every webhook delivered, every task run, no job being worked on."""
    assert stack.relay is not None
    stack.relay.wait_idle()
    if stack.tasks is not None:
        assert stack.tasks.wait_idle(60)
    wait_until(lambda: no_job_where(stack.database_url, "status = 'processing'"), 60)


def as_user(stack: LocalStack, user_id: uuid.UUID) -> dict[str, str]:
    return {"apikey": stack.publishable_key, "Authorization": f"Bearer {stack.user_token(user_id)}"}


@pytest.mark.parametrize(
    "refusal",
    [Behaviour("error", 402), Behaviour("error", 401), Behaviour("html403")],
    ids=["402", "401", "html403"],
)
def test_an_account_level_storm_pauses_with_no_job_failed_then_a_probe_resumes_everything(
    stack: LocalStack, refusal: Behaviour
) -> None:
    assert stack.double is not None
    stack.double.script(*[refusal] * (JOBS * 4))
    jobs = [stack.insert_job(f"storm {i}", duration=1, quality="low") for i in range(JOBS)]
    settle(stack)

    storm = rows(stack)
    assert [r["status"] for r in storm] == ["pending"] * JOBS  # none failed
    assert [r["attempts"] for r in storm] == [0] * JOBS  # no attempt used up
    assert stack.double.call_count <= JOBS  # none retried in place: at most one call each
    (pause,) = sql(stack.database_url, "select * from sona_pauses", role=None)
    assert pause["lifted_at"] is None

    # Time passes and the account is fixed: the pause ends; reclaim sends one probe.
    stack.double.reset()
    sql(
        stack.database_url,
        "update sona_pauses set until = now(); update jobs set run_after = null",
        role=None,
    )
    first = reclaim(stack)
    assert first["due"] == 1
    wait_until(
        lambda: (
            sql(stack.database_url, "select lifted_at from sona_pauses", role=None)[0]["lifted_at"]
            is not None
        ),
        60,
    )

    second = reclaim(stack)
    assert second["due"] == JOBS - 1
    wait_until(lambda: no_job_where(stack.database_url, "status <> 'completed'"), 90)
    assert stack.double.paid_generations == JOBS
    assert {stack.job(j)["attempts"] for j in jobs} == {1}


def test_a_job_cancelled_before_it_ran_is_never_generated(stack: LocalStack) -> None:
    assert stack.double is not None and stack.relay is not None
    stack.relay.enabled = False  # its webhook is lost: only reclaim could dispatch it
    user = stack.create_user()
    job = stack.insert_job("never mind", duration=1, user_id=user)
    cancelled = requests.post(
        f"{stack.supabase_url}/rest/v1/rpc/cancel_job",
        headers=as_user(stack, user),
        json={"p_job_id": str(job)},
        timeout=30,
    )
    assert cancelled.json()[0]["status"] == "cancelled"
    assert reclaim(stack)["due"] == 0
    assert (stack.job(job)["status"], stack.double.call_count) == ("cancelled", 0)


def test_a_job_cancelled_during_its_generation_is_never_written(stack: LocalStack) -> None:
    assert stack.double is not None
    stack.double.script(Behaviour("ok", delay_s=2.0))
    user = stack.create_user()
    job = stack.insert_job("long one", duration=1, user_id=user)
    wait_until(lambda: stack.double is not None and stack.double.call_count == 1, 30)
    requests.post(
        f"{stack.supabase_url}/rest/v1/rpc/cancel_job",
        headers=as_user(stack, user),
        json={"p_job_id": str(job)},
        timeout=30,
    )
    wait_until(lambda: stack.double is not None and stack.double.calls[0].finished is not None, 30)
    settle(stack)
    row = stack.job(job)
    assert (row["status"], row["wav_url"], row["mp3_url"]) == ("cancelled", None, None)
    assert stack.double.call_count == 1  # the one call already under way; nothing after it
