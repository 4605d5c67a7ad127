"""Quotas and cancellation as the plug-in meets them: a signed-in user's JWT through the local
gateway (PostgREST's insert and RPC), against the real migrated database."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import pytest
import requests

from devstack.emulators.gateway import Gateway
from devstack.emulators.user_jwt import make_user_jwt
from tests.support import insert_job, job_row, new_user, sql


def as_user(gateway: Gateway, user_id: uuid.UUID) -> dict[str, str]:
    """What a signed-in client sends: the publishable key, and the user's access token."""
    return {
        "apikey": gateway.publishable_key,
        "Authorization": f"Bearer {make_user_jwt(gateway.jwt_secret, user_id)}",
    }


def insert(gateway: Gateway, user_id: uuid.UUID, prompt: str = "warm pad") -> requests.Response:
    return requests.post(
        f"{gateway.url}/rest/v1/jobs",
        headers={**as_user(gateway, user_id), "Prefer": "return=representation"},
        json={"user_id": str(user_id), "prompt": prompt, "duration": 5},
        timeout=30,
    )


def cancel(gateway: Gateway, user_id: uuid.UUID, job_id: uuid.UUID) -> requests.Response:
    return requests.post(
        f"{gateway.url}/rest/v1/rpc/cancel_job",
        headers=as_user(gateway, user_id),
        json={"p_job_id": str(job_id)},
        timeout=30,
    )


def set_limits(db_url: str, **limits: int) -> None:
    for key, value in limits.items():
        sql(db_url, "insert into sona_settings (key, value) values (%s, %s)", key, value)


# -- the user's token ----------------------------------------------------------------------------


def test_a_users_insert_runs_as_that_user_and_answers_the_row(gateway: Gateway, db_url: str) -> None:
    me = new_user(db_url)
    answer = insert(gateway, me)
    assert answer.status_code == 201, answer.text
    (row,) = answer.json()
    assert (row["user_id"], row["status"], row["attempts"]) == (str(me), "pending", 0)


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (lambda g, u: make_user_jwt("not-the-projects-secret", u), "PGRST301"),
        (lambda g, u: make_user_jwt(g.jwt_secret, u, ttl_s=-10), "PGRST303"),
    ],
    ids=["forged", "expired"],
)
def test_a_token_the_project_did_not_sign_or_that_expired_is_refused(
    gateway: Gateway, db_url: str, token: Any, code: str
) -> None:
    me = new_user(db_url)
    answer = requests.post(
        f"{gateway.url}/rest/v1/jobs",
        headers={"apikey": gateway.publishable_key, "Authorization": f"Bearer {token(gateway, me)}"},
        json={"user_id": str(me), "prompt": "warm pad"},
        timeout=30,
    )
    assert (answer.status_code, answer.json()["code"]) == (401, code)
    assert sql(db_url, "select count(*) as n from jobs")[0]["n"] == 0


def test_a_user_cannot_insert_a_job_for_someone_else(gateway: Gateway, db_url: str) -> None:
    me, other = new_user(db_url), new_user(db_url)
    answer = requests.post(
        f"{gateway.url}/rest/v1/jobs",
        headers=as_user(gateway, me),
        json={"user_id": str(other), "prompt": "warm pad"},
        timeout=30,
    )
    assert (answer.status_code, answer.json()["code"]) == (403, "42501")  # row level security


# -- quotas ----------------------------------------------------------------------------------------


def test_an_insert_over_the_active_limit_is_refused_with_a_message_the_plugin_shows(
    gateway: Gateway, db_url: str
) -> None:
    me = new_user(db_url)
    assert [insert(gateway, me).status_code for _ in range(3)] == [201, 201, 201]  # the default 3
    refused = insert(gateway, me)
    assert refused.status_code == 400
    body = refused.json()
    assert (body["code"], body["hint"]) == ("SQ001", "sona_quota_active")
    assert body["message"] == "You have 3 jobs running; wait for one to finish."
    assert sql(db_url, "select count(*) as n from jobs where user_id = %s", me)[0]["n"] == 3


def test_a_finished_job_frees_its_place_in_the_active_limit(gateway: Gateway, db_url: str) -> None:
    me = new_user(db_url)
    set_limits(db_url, max_active_jobs=1)
    first = uuid.UUID(insert(gateway, me).json()[0]["id"])
    assert insert(gateway, me).status_code == 400
    sql(db_url, "update jobs set status = 'completed' where id = %s", first, role=None)
    assert insert(gateway, me).status_code == 201


def test_twenty_simultaneous_inserts_over_the_limit_let_exactly_the_limit_through(
    gateway: Gateway, db_url: str
) -> None:
    me = new_user(db_url)
    start = Barrier(20)

    def one(_: int) -> int:
        start.wait()
        return insert(gateway, me).status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = sorted(pool.map(one, range(20)))
    assert statuses == [201] * 3 + [400] * 17
    assert sql(db_url, "select count(*) as n from jobs where user_id = %s", me)[0]["n"] == 3
    stats = sql(db_url, "select spend_stats(24) as s")[0]["s"]
    assert stats["quota"]["refused_active_total"] >= 17  # counted though every refusal rolled back


def test_the_daily_limit_counts_finished_jobs_too(gateway: Gateway, db_url: str) -> None:
    me = new_user(db_url)
    set_limits(db_url, max_jobs_per_day=2, max_active_jobs=10)
    for _ in range(2):
        insert_job(db_url, user_id=me, status="completed")
    refused = insert(gateway, me)
    assert (refused.status_code, refused.json()["code"]) == (400, "SQ002")
    assert "in the last 24 hours" in refused.json()["message"]


def test_limits_are_per_user(gateway: Gateway, db_url: str) -> None:
    set_limits(db_url, max_active_jobs=1)
    me, other = new_user(db_url), new_user(db_url)
    assert [insert(gateway, me).status_code, insert(gateway, other).status_code] == [201, 201]


def test_the_service_role_is_exempt_from_quotas(db_url: str) -> None:
    me = new_user(db_url)
    for _ in range(5):
        insert_job(db_url, user_id=me)  # as the service role: over the default limit of 3
    assert sql(db_url, "select count(*) as n from jobs where user_id = %s", me)[0]["n"] == 5


def test_a_prompt_longer_than_the_providers_limit_is_refused_by_the_table(
    gateway: Gateway, db_url: str
) -> None:
    me = new_user(db_url)
    refused = insert(gateway, me, prompt="x" * 10_001)
    assert (refused.status_code, refused.json()["code"]) == (400, "23514")
    assert insert(gateway, me, prompt="x" * 10_000).status_code == 201


# -- cancellation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["pending", "queued", "processing"])
def test_a_user_cancels_their_own_live_job(gateway: Gateway, db_url: str, status: str) -> None:
    me = new_user(db_url)
    job = insert_job(db_url, user_id=me, status=status, lease_token=uuid.uuid4())
    answer = cancel(gateway, me, job)
    assert answer.status_code == 200
    (row,) = answer.json()
    assert (row["status"], row["lease_token"]) == ("cancelled", None)
    assert job_row(db_url, job)["cancelled_at"] is not None


@pytest.mark.parametrize(
    ("owner", "status"),
    [("someone else", "pending"), ("me", "completed"), ("me", "failed"), ("me", "cancelled")],
)
def test_cancel_touches_no_one_elses_job_and_no_finished_one(
    gateway: Gateway, db_url: str, owner: str, status: str
) -> None:
    me, other = new_user(db_url), new_user(db_url)
    job = insert_job(db_url, user_id=me if owner == "me" else other, status=status)
    answer = cancel(gateway, me, job)
    assert (answer.status_code, answer.json()) == (200, [])
    assert job_row(db_url, job)["status"] == status


def test_a_cancelled_job_is_never_claimed_and_refuses_the_workers_fenced_writes(
    gateway: Gateway, db_url: str
) -> None:
    me = new_user(db_url)
    job, token = insert_job(db_url, user_id=me), uuid.uuid4()
    claimed = sql(db_url, "select * from claim_job(%s, %s, 60, 3)", job, token)
    assert len(claimed) == 1
    cancel(gateway, me, job)
    writes = [
        "select * from complete_job(%s, %s, 'w', 'm', '{}'::jsonb)",
        "select * from fail_job(%s, %s, 'x', true, 3, 10, 100)",
        "select * from pause_service(%s, %s, 'c', 'r', 'm', 60)",
    ]
    for write in writes:
        sql(db_url, write, job, token)
    assert sql(db_url, "select * from claim_job(%s, %s, 60, 3)", job, uuid.uuid4()) == []
    row = job_row(db_url, job)
    assert (row["status"], row["wav_url"]) == ("cancelled", None)
    assert sql(db_url, "select outcome from job_attempts where job_id = %s", job) == [
        {"outcome": "cancelled"}
    ]
