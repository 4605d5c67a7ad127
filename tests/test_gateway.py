"""The local gateway answers like PostgREST and Supabase Storage for the calls this project makes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from werkzeug.wrappers import Request

from devstack.emulators.gateway import Gateway, make_jwt
from devstack.emulators.user_jwt import make_user_jwt
from devstack.serving import json_response, serve_wsgi, stop_server
from tests.support import connect, insert_job, new_user, sql, web

ZERO = "00000000-0000-0000-0000-000000000000"


def rpc(gw: Gateway, name: str, body: object, key: str | None = None) -> httpx.Response:
    key = gw.service_role_key if key is None else key
    headers = {"apikey": key, "Authorization": f"Bearer {key}"} if key else {}
    return web.post(f"{gw.url}/rest/v1/rpc/{name}", json=body, headers=headers)


def test_a_setof_function_answers_an_array_even_when_empty(gateway: Gateway) -> None:
    response = rpc(
        gateway,
        "claim_job",  # a job that does not exist: nothing to claim
        {
            "p_job_id": str(uuid.uuid4()),
            "p_claim_id": str(uuid.uuid4()),
            "p_lease_seconds": 60,
            "p_max_attempts": 3,
        },
    )
    assert (response.status_code, response.json()) == (200, [])


CLAIM = {"p_lease_seconds": 60, "p_max_attempts": 3}


def test_a_singular_accept_takes_the_one_row_of_a_set_returning_function(
    gateway: Gateway, db_url: str
) -> None:
    job_id = str(insert_job(db_url))
    body = {"p_job_id": job_id, "p_claim_id": str(uuid.uuid4()), **CLAIM}
    key = gateway.service_role_key
    headers = {"apikey": key, "Authorization": f"Bearer {key}", "Accept": "application/vnd.pgrst.object+json"}
    response = web.post(f"{gateway.url}/rest/v1/rpc/claim_job", json=body, headers=headers)
    assert response.status_code == 200
    assert response.json()["id"] == job_id and response.json()["status"] == "processing"


def test_a_singular_accept_on_no_rows_is_pgrst116(gateway: Gateway, db_url: str) -> None:
    """claim_job answers no row for a job it cannot claim: one object was asked for, none came."""
    body = {"p_job_id": ZERO, "p_claim_id": str(uuid.uuid4()), **CLAIM}
    key = gateway.service_role_key
    headers = {"apikey": key, "Authorization": f"Bearer {key}", "Accept": "application/vnd.pgrst.object+json"}
    response = web.post(f"{gateway.url}/rest/v1/rpc/claim_job", json=body, headers=headers)
    assert (response.status_code, response.json()["code"]) == (406, "PGRST116")
    assert response.json()["details"] == "The result contains 0 rows"


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


@pytest.mark.parametrize(("kind", "status"), [("secret_key", 200), ("publishable_key", 401)])
def test_a_new_key_sent_as_bearer_and_apikey_acts_for_its_role_as_supabases_gateway_resolves_it(
    gateway: Gateway, kind: str, status: int
) -> None:
    """supabase-js 2.119 sends the key in both headers when nobody is signed in; the platform's
    gateway resolves it to the key's role (the publishable key is anon: job_stats is refused)."""
    key = getattr(gateway, kind)
    response = rpc(gateway, "job_stats", STATS, key=key)
    assert response.status_code == status
    if status == 401:
        assert response.json()["code"] == "42501"


@pytest.mark.parametrize("kind", ["secret_key", "publishable_key"])
def test_a_new_key_as_bearer_beside_another_apikey_gets_postgrests_pgrst301(
    gateway: Gateway, kind: str
) -> None:
    """Only the request's own key is resolved: a different non-JWT Bearer reaches PostgREST as is."""
    headers = {"apikey": gateway.anon_key, "Authorization": f"Bearer {getattr(gateway, kind)}"}
    response = web.post(f"{gateway.url}/rest/v1/rpc/job_stats", json=STATS, headers=headers)
    assert (response.status_code, response.json()) == (401, NOT_A_JWT)
    assert response.headers["Proxy-Status"] == "PostgREST; error=PGRST301"


def claim_as(gateway: Gateway, headers: dict[str, str], db_url: str) -> httpx.Response:
    body = {
        "p_job_id": str(insert_job(db_url)),
        "p_claim_id": str(uuid.uuid4()),
        "p_lease_seconds": 60,
        "p_max_attempts": 3,
    }
    return web.post(f"{gateway.url}/rest/v1/rpc/claim_job", json=body, headers=headers)


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
        return web.post(f"{gateway.url}/storage/v1/bucket", json={"name": bucket}, headers=headers)
    if route == "upload":
        return web.post(
            f"{gateway.url}/storage/v1/object/{bucket}/generated/a.wav",
            content=b"RIFF",
            headers={**headers, "content-type": "audio/wav"},
        )
    return web.post(
        f"{gateway.url}/storage/v1/object/list/{bucket}", json={"prefix": "generated"}, headers=headers
    )


@pytest.mark.parametrize("kind", ["secret_key", "publishable_key"])
def test_storage_answers_invalid_compact_jws_to_a_bearer_that_is_not_a_jwt(
    gateway: Gateway, kind: str
) -> None:
    key = getattr(gateway, kind)
    headers = {"apikey": gateway.anon_key, "Authorization": f"Bearer {key}"}
    response = storage_call(gateway, "bucket_create", headers)
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
    if kind == "publishable_key_as_bearer":  # supabase-js when nobody is signed in
        return {"apikey": gateway.publishable_key, "Authorization": f"Bearer {gateway.publishable_key}"}
    return {"apikey": gateway.anon_key, "Authorization": f"Bearer {gateway.anon_key}"}


@pytest.fixture
def stored(gateway: Gateway) -> Gateway:
    """A bucket with one object in it, written with the secret key."""
    assert storage_call(gateway, "bucket_create", {"apikey": gateway.secret_key}).status_code == 200
    assert storage_call(gateway, "upload", {"apikey": gateway.secret_key}).status_code == 200
    return gateway


@pytest.mark.parametrize("kind", ["publishable_key", "publishable_key_as_bearer", "anon_key"])
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


# -- tables: PostgREST's errors for what it refuses, and for what this gateway does not translate
TABLE_ERRORS = [
    ("GET", "/rest/v1/no_such_table?select=*", {}, 404, "PGRST205"),
    ("GET", "/rest/v1/jobs?select=no_such_column", {}, 400, "42703"),
    ("GET", "/rest/v1/jobs?select=*&no_such_column=eq.1", {}, 400, "42703"),
    ("GET", "/rest/v1/jobs?select=*&id=eq.not-a-uuid", {}, 400, "22P02"),
    ("GET", "/rest/v1/jobs?select=id,owner:users(email)", {}, 400, "PGRST100"),  # embedding
    ("GET", "/rest/v1/jobs?select=duration::text", {}, 400, "PGRST100"),  # casts
    ("GET", "/rest/v1/jobs?or=(status.eq.queued,status.eq.pending)", {}, 400, "PGRST100"),
    ("GET", "/rest/v1/jobs?prompt=fts.forest", {}, 400, "PGRST100"),
    ("GET", "/rest/v1/jobs?limit=ten", {}, 400, "PGRST100"),
    ("GET", "/rest/v1/jobs?select=*", {"Accept": "text/csv"}, 406, "PGRST107"),
    ("GET", "/rest/v1/jobs?select=*", {"Accept-Profile": "storage"}, 406, "PGRST106"),
    ("POST", "/rest/v1/jobs", {"Prefer": "resolution=merge-duplicates"}, 400, "PGRST122"),
    ("POST", "/rest/v1/jobs", {"Prefer": "count=exact"}, 400, "PGRST122"),
    ("POST", "/rest/v1/jobs", {"Content-Type": "application/json"}, 400, "PGRST102"),
    ("PUT", "/rest/v1/jobs?id=eq.1", {}, 405, "PGRST117"),
]


@pytest.mark.parametrize(("method", "path", "extra", "status", "code"), TABLE_ERRORS)
def test_table_errors_have_postgrests_body_status_and_code(
    gateway: Gateway, method: str, path: str, extra: dict[str, str], status: int, code: str
) -> None:
    key = gateway.service_role_key
    headers = {"apikey": key, "Authorization": f"Bearer {key}", **extra}
    response = web.request(
        method, f"{gateway.url}{path}", headers=headers, content=b"" if method != "GET" else None
    )
    assert response.status_code == status, response.text
    assert set(response.json()) == {"code", "details", "hint", "message"}
    assert response.json()["code"] == code
    assert response.headers["Proxy-Status"] == f"PostgREST; error={code}"


def test_a_head_error_has_no_body_but_its_status_and_code_in_proxy_status(gateway: Gateway) -> None:
    key = gateway.service_role_key
    headers = {"apikey": key, "Authorization": f"Bearer {key}", "Prefer": "count=exact"}
    response = web.head(f"{gateway.url}/rest/v1/no_such_table?select=*", headers=headers)
    assert (response.status_code, response.content) == (404, b"")
    assert response.headers["Proxy-Status"] == "PostgREST; error=PGRST205"


def test_what_is_not_translated_says_so_in_the_details(gateway: Gateway) -> None:
    key = gateway.service_role_key
    headers = {"apikey": key, "Authorization": f"Bearer {key}"}
    response = web.get(f"{gateway.url}/rest/v1/jobs?select=id,owner:users(email)", headers=headers)
    assert response.json()["details"].startswith("not served by the local gateway")


def test_a_write_refused_by_row_level_security_is_postgrests_42501(gateway: Gateway, db_url: str) -> None:
    """A signed-in user inserting a job for someone else: the database refuses, the body says why."""
    user, other = new_user(db_url), new_user(db_url)
    token = make_user_jwt(gateway.jwt_secret, user)
    response = web.post(
        f"{gateway.url}/rest/v1/jobs",
        json={"user_id": str(other), "prompt": "not mine to ask for", "duration": 5},
        headers={"apikey": gateway.publishable_key, "Authorization": f"Bearer {token}"},
    )
    assert (response.status_code, response.json()["code"]) == (403, "42501")
    assert "row-level security" in response.json()["message"]


def test_a_filtered_update_and_delete_answer_the_rows_they_changed_with_the_selected_columns(
    gateway: Gateway, db_url: str
) -> None:
    """PATCH and DELETE take the same filters as reads, and `select` shapes what they answer."""
    mine = insert_job(db_url)
    key = gateway.service_role_key
    headers = {"apikey": key, "Authorization": f"Bearer {key}", "Prefer": "return=representation"}
    patched = web.patch(
        f"{gateway.url}/rest/v1/jobs?id=eq.{mine}&select=id,error_message",
        json={"error_message": "patched"},
        headers={**headers, "Accept": "application/vnd.pgrst.object+json"},
    )
    assert (patched.status_code, patched.json()) == (200, {"id": str(mine), "error_message": "patched"})
    deleted = web.delete(f"{gateway.url}/rest/v1/jobs?id=in.({mine},{ZERO})", headers=headers)
    assert (deleted.status_code, [r["id"] for r in deleted.json()]) == (200, [str(mine)])


@pytest.mark.parametrize(("method", "verb"), [("PATCH", "UPDATE"), ("DELETE", "DELETE")])
def test_an_update_or_delete_with_no_filter_is_refused_as_pg_safeupdate_refuses_it(
    gateway: Gateway, db_url: str, method: str, verb: str
) -> None:
    """Supabase loads pg-safeupdate for PostgREST: a write with no filter changes nothing, instead of
    every row the caller may see."""
    mine = insert_job(db_url)
    key = gateway.service_role_key
    response = web.request(
        method,
        f"{gateway.url}/rest/v1/jobs",
        json={"error_message": "everyone's"} if method == "PATCH" else None,
        headers={"apikey": key, "Authorization": f"Bearer {key}"},
    )
    assert response.json()["code"] == "21000", response.text
    assert response.json()["message"] == f"{verb} requires a WHERE clause"
    assert response.status_code >= 400
    (row,) = sql(db_url, "select error_message from jobs where id = %s", mine, role=None)
    assert row["error_message"] is None


# -- /functions/v1/*: forwarded to the developer's own Edge Functions server
def _echo(environ: dict[str, Any], start_response: Any) -> Any:
    """A stand-in for the developer's functions server: answers what it was sent."""
    request = Request(environ)
    body = {
        "method": request.method,
        "path": request.path,
        "query": request.query_string.decode(),
        "authorization": request.headers.get("Authorization"),
        "apikey": request.headers.get("apikey"),
        "body": request.get_data(as_text=True),
    }
    return json_response(body, 201)(environ, start_response)


@pytest.fixture
def functions_server() -> Iterator[str]:
    server, url = serve_wsgi(_echo, "127.0.0.1", 0, "functions-echo")
    yield url
    stop_server(server)


def test_functions_are_forwarded_to_the_developers_server_as_they_came(
    db_url: str, tmp_path: Path, functions_server: str
) -> None:
    secret = "local-jwt-secret-for-tests"
    gw = Gateway(
        db_url,
        tmp_path / "storage",
        service_role_key=make_jwt(secret, "service_role"),
        anon_key=make_jwt(secret, "anon"),
        jwt_secret=secret,
        functions_url=functions_server,
    )
    gw.start()
    try:
        answer = web.post(
            f"{gw.url}/functions/v1/generate?dry=1",
            content=b'{"prompt": "rain"}',
            headers={"Authorization": "Bearer user-token", "apikey": gw.publishable_key},
        )
    finally:
        gw.stop()
    assert answer.status_code == 201
    assert answer.json() == {
        "method": "POST",
        "path": "/generate",
        "query": "dry=1",
        "authorization": "Bearer user-token",
        "apikey": gw.publishable_key,
        "body": '{"prompt": "rain"}',
    }


def test_with_no_functions_server_a_function_is_not_found_and_says_how_to_name_one(gateway: Gateway) -> None:
    answer = web.post(f"{gateway.url}/functions/v1/generate", json={})
    assert (answer.status_code, answer.json()["code"]) == (404, "NOT_FOUND")
    assert "--functions-url" in answer.json()["hint"]


def test_an_insert_of_two_rows_asked_for_as_one_object_is_pgrst116_and_stores_neither(
    gateway: Gateway, db_url: str
) -> None:
    user = str(new_user(db_url))
    rows = [{"user_id": user, "prompt": f"one of two ({n})", "duration": 5} for n in (1, 2)]
    key = gateway.service_role_key
    headers = {
        "apikey": key,
        "Authorization": f"Bearer {key}",
        "Prefer": "return=representation",
        "Accept": "application/vnd.pgrst.object+json",
    }
    response = web.post(f"{gateway.url}/rest/v1/jobs", json=rows, headers=headers)
    assert (response.status_code, response.json()["details"]) == (406, "The result contains 2 rows")
    with connect(db_url) as conn:
        stored = conn.execute("select count(*) as n from public.jobs where user_id = %s", (user,)).fetchone()
    assert stored == {"n": 0}
