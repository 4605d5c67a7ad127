"""The local gateway answers like PostgREST and Supabase Storage for the calls this project makes."""

from __future__ import annotations

import httpx
import pytest

from sona.local.gateway import Gateway
from tests.support import insert_job

ZERO = "00000000-0000-0000-0000-000000000000"


def rpc(gw: Gateway, name: str, body: object, key: str | None = None) -> httpx.Response:
    key = gw.service_role_key if key is None else key
    headers = {"apikey": key, "Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{gw.url}/rest/v1/rpc/{name}", json=body, headers=headers)


def test_a_setof_function_answers_an_array_even_when_empty(gateway: Gateway) -> None:
    response = rpc(
        gateway,
        "reclaim_jobs",
        {
            "p_max_attempts": 3,
            "p_grace_seconds": 60,
            "p_limit": 10,
            "p_base_delay_ms": 1,
            "p_max_delay_ms": 1,
        },
    )
    assert (response.status_code, response.json()) == (200, [])


def test_a_scalar_function_answers_the_scalar(gateway: Gateway) -> None:
    response = rpc(gateway, "sona_backoff", {"p_attempt": 1, "p_base_ms": 0, "p_cap_ms": 0})
    assert response.status_code == 200
    assert response.json() == "00:00:00"


@pytest.mark.parametrize(
    ("name", "body", "status", "code"),
    [
        ("no_such_function", {}, 404, "PGRST202"),
        ("claim_job", {"p_job_id": "x"}, 404, "PGRST202"),  # arguments do not match
        (
            "claim_job",
            {"p_job_id": "not-a-uuid", "p_claim_id": ZERO, "p_lease_seconds": 1, "p_max_attempts": 1},
            400,
            "22P02",
        ),
    ],
)
def test_errors_have_postgrests_body_and_status(
    gateway: Gateway, name: str, body: object, status: int, code: str
) -> None:
    response = rpc(gateway, name, body)
    assert response.status_code == status
    assert set(response.json()) == {"code", "details", "hint", "message"}
    assert response.json()["code"] == code


def test_permission_denied_is_401_for_anon(gateway: Gateway, db_url: str) -> None:
    response = rpc(
        gateway,
        "claim_job",
        {
            "p_job_id": str(insert_job(db_url)),
            "p_claim_id": ZERO,
            "p_lease_seconds": 1,
            "p_max_attempts": 1,
        },
        key=gateway.anon_key,
    )
    assert (response.status_code, response.json()["code"]) == (401, "42501")


@pytest.mark.parametrize("key", ["", "not-the-key"])
def test_a_missing_or_wrong_api_key_is_refused(gateway: Gateway, key: str) -> None:
    response = rpc(gateway, "sona_backoff", {"p_attempt": 1, "p_base_ms": 0, "p_cap_ms": 0}, key=key)
    assert response.status_code == 401
