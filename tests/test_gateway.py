"""The local gateway answers like PostgREST and Supabase Storage for the calls this project makes."""

from __future__ import annotations

import uuid

import httpx
import pytest

from devstack.emulators.gateway import Gateway
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


NOT_A_JWT = {"code": "PGRST301", "details": None, "hint": None, "message": "Expected 3 parts in JWT; got 1"}
STATS = {"p_window_hours": 1}


@pytest.mark.parametrize("kind", ["secret_key", "publishable_key"])
def test_a_new_key_sent_as_bearer_gets_postgrests_pgrst301(gateway: Gateway, kind: str) -> None:
    key = getattr(gateway, kind)
    response = rpc(gateway, "job_stats", STATS, key=key)
    assert (response.status_code, response.json()) == (401, NOT_A_JWT)


def claim_as(gateway: Gateway, headers: dict[str, str], db_url: str) -> httpx.Response:
    body = {
        "p_job_id": str(insert_job(db_url)),
        "p_claim_id": str(uuid.uuid4()),
        "p_lease_seconds": 60,
        "p_max_attempts": 3,
    }
    return httpx.post(f"{gateway.url}/rest/v1/rpc/claim_job", json=body, headers=headers)


@pytest.mark.parametrize(
    ("kind", "status"),
    [("secret_key", 200), ("publishable_key", 401)],  # the publishable key is anon: 42501 is 401
)
def test_a_new_key_in_apikey_alone_acts_for_its_role(
    gateway: Gateway, db_url: str, kind: str, status: int
) -> None:
    response = claim_as(gateway, {"apikey": getattr(gateway, kind)}, db_url)
    assert response.status_code == status
    if status == 401:
        assert response.json()["code"] == "42501"


def test_an_api_key_is_needed_even_with_a_valid_bearer(gateway: Gateway, db_url: str) -> None:
    key = gateway.service_role_key
    response = claim_as(gateway, {"Authorization": f"Bearer {key}"}, db_url)
    assert (response.status_code, response.json()["message"]) == (401, "No API key found in request")


def storage_call(
    gateway: Gateway, route: str, headers: dict[str, str], bucket: str = "audio"
) -> httpx.Response:
    if route == "bucket_create":
        return httpx.post(f"{gateway.url}/storage/v1/bucket", json={"name": bucket}, headers=headers)
    if route == "upload":
        return httpx.post(
            f"{gateway.url}/storage/v1/object/{bucket}/generated/a.wav",
            content=b"RIFF",
            headers={**headers, "content-type": "audio/wav"},
        )
    return httpx.post(
        f"{gateway.url}/storage/v1/object/list/{bucket}", json={"prefix": "generated"}, headers=headers
    )


@pytest.mark.parametrize("kind", ["secret_key", "publishable_key"])
def test_storage_answers_invalid_compact_jws_to_a_bearer_that_is_not_a_jwt(
    gateway: Gateway, kind: str
) -> None:
    key = getattr(gateway, kind)
    response = storage_call(gateway, "bucket_create", {"apikey": key, "Authorization": f"Bearer {key}"})
    assert response.status_code == 400
    assert response.json() == {
        "statusCode": "403",
        "code": "AccessDenied",
        "error": "Unauthorized",
        "message": "Invalid Compact JWS",
    }


RLS_REFUSAL = {
    "statusCode": "403",
    "code": "AccessDenied",
    "error": "Unauthorized",
    "message": "new row violates row-level security policy",
}


def anon_headers(gateway: Gateway, kind: str) -> dict[str, str]:
    if kind == "publishable_key":
        return {"apikey": gateway.publishable_key}
    return {"apikey": gateway.anon_key, "Authorization": f"Bearer {gateway.anon_key}"}


@pytest.fixture
def stored(gateway: Gateway) -> Gateway:
    """A bucket with one object in it, written with the secret key."""
    assert storage_call(gateway, "bucket_create", {"apikey": gateway.secret_key}).status_code == 200
    assert storage_call(gateway, "upload", {"apikey": gateway.secret_key}).status_code == 200
    return gateway


@pytest.mark.parametrize("kind", ["publishable_key", "anon_key"])
@pytest.mark.parametrize(
    ("route", "bucket", "status", "body"),
    [
        ("bucket_create", "another", 400, RLS_REFUSAL),
        ("upload", "audio", 400, RLS_REFUSAL),
        ("list", "audio", 200, []),
    ],
)
def test_row_level_security_refuses_writes_and_hides_listings_from_an_anon_key(
    stored: Gateway, kind: str, route: str, bucket: str, status: int, body: object
) -> None:
    response = storage_call(stored, route, anon_headers(stored, kind), bucket)
    assert (response.status_code, response.json()) == (status, body)


def test_the_secret_key_lists_what_an_anon_key_cannot_see(stored: Gateway) -> None:
    response = storage_call(stored, "list", {"apikey": stored.secret_key})
    assert [item["name"] for item in response.json()] == ["a.wav"]
