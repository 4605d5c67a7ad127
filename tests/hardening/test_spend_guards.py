"""What protects the credit balance, tried the way a misbehaving client or a broken account would:
a signed-in user past the quota or with a forged token, cancelling someone else's job; and an
account-level refusal hitting several jobs at once (nothing failed, no attempt used, one pause)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour
from devstack.emulators.user_jwt import make_user_jwt
from devstack.stack import LocalStack
from tests.hardening.conftest import Ledger, settle
from tests.support import sql


def headers(stack: LocalStack, token: str) -> dict[str, str]:
    return {"apikey": stack.publishable_key, "Authorization": f"Bearer {token}"}


def insert_as(stack: LocalStack, user: uuid.UUID, token: str) -> requests.Response:
    return requests.post(
        f"{stack.supabase_url}/rest/v1/jobs",
        headers={**headers(stack, token), "Prefer": "return=representation"},
        json={"user_id": str(user), "prompt": f"guard {uuid.uuid4().hex[:6]}", "duration": 1},
        timeout=30,
    )


TOKENS: list[tuple[str, Callable[[LocalStack, uuid.UUID], str], str]] = [
    (
        "token signed with another secret",
        lambda s, u: make_user_jwt("not-this-projects-secret", u),
        "PGRST301",
    ),
    ("expired token", lambda s, u: make_user_jwt(s.jwt_secret, u, ttl_s=-1), "PGRST303"),
]


@pytest.mark.parametrize(("name", "token", "code"), TOKENS, ids=[t[0] for t in TOKENS])
def test_a_token_the_project_did_not_issue_inserts_nothing(
    stack: LocalStack, ledger: Ledger, name: str, token: Callable[[LocalStack, uuid.UUID], str], code: str
) -> None:
    user = stack.create_user()
    answer = insert_as(stack, user, token(stack, user))
    ledger.responses.append(answer.text)
    ledger.bad_inputs.append((f"user: {name}", f"{answer.status_code} {answer.json()['code']}"))
    assert (answer.status_code, answer.json()["code"]) == (401, code)


def test_a_user_past_the_active_quota_is_refused_with_the_plugins_message(
    stack: LocalStack, ledger: Ledger
) -> None:
    stack.relay.enabled = False  # type: ignore[union-attr]  # the jobs stay active while we try
    user = stack.create_user()
    token = stack.user_token(user)
    answers = [insert_as(stack, user, token) for _ in range(4)]
    ledger.responses.extend(a.text for a in answers)
    refused = answers[-1]
    ledger.bad_inputs.append(
        ("user: a fourth job while three run", f"{refused.status_code} {refused.json()['code']}")
    )
    assert [a.status_code for a in answers] == [201, 201, 201, 400]
    assert refused.json()["message"] == "You have 3 jobs running; wait for one to finish."
    for answer in answers[:3]:
        settle(stack, uuid.UUID(answer.json()[0]["id"]))


def test_a_user_cannot_cancel_someone_elses_job(stack: LocalStack, ledger: Ledger) -> None:
    owner, other = stack.create_user(), stack.create_user()
    job = stack.insert_job("not yours", duration=1, user_id=owner)
    answer = requests.post(
        f"{stack.supabase_url}/rest/v1/rpc/cancel_job",
        headers=headers(stack, stack.user_token(other)),
        json={"p_job_id": str(job)},
        timeout=30,
    )
    ledger.bad_inputs.append(("user: cancel someone else's job", f"{answer.status_code} {answer.text}"))
    assert answer.json() == []
    assert settle(stack, job)["status"] == "completed"


def test_a_402_storm_across_jobs_fails_none_uses_no_attempt_and_pauses_once(
    stack: LocalStack, ledger: Ledger
) -> None:
    assert stack.double is not None and stack.relay is not None
    stack.double.script(*[Behaviour("error", 402)] * 20)
    jobs = [stack.insert_job(f"storm {i} {uuid.uuid4().hex[:6]}", duration=1) for i in range(5)]
    stack.relay.wait_idle()
    rows = [stack.job(j) for j in jobs]
    pauses = sql(stack.database_url, "select * from sona_pauses where lifted_at is null", role=None)
    ledger.faults.append(
        ("provider: 402 to 5 jobs at once", f"{len(pauses)} pause, {[r['status'] for r in rows]}")
    )
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 0)}
    assert len(pauses) == 1
    stack.double.reset()  # credits bought
    ends = [settle(stack, j)["status"] for j in jobs]
    assert ends == ["completed"] * 5
    assert sql(
        stack.database_url, "select count(*) as n from sona_pauses where lifted_at is null", role=None
    ) == [{"n": 0}]
