"""The gateway's Supabase Auth endpoints, as supabase-js calls them: `auth.getUser(token)` is
`GET /auth/v1/user` with the key as `apikey` and the user's access token as Bearer, answered with
GoTrue's user object; `signInWithPassword` is `POST /auth/v1/token?grant_type=password` with
`{"email", "password", "gotrue_meta_security": {}}`, answered with GoTrue's session (access_token,
token_type, expires_in, expires_at, refresh_token, user). Errors are GoTrue's {code, error_code, msg}."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from devstack.emulators.gateway import Gateway
from devstack.emulators.user_jwt import make_user_jwt, sign_jwt
from tests.support import connect, web

EMAIL = "musician@example.com"
GOTRUE_USER_KEYS = {
    "id",
    "aud",
    "role",
    "email",
    "email_confirmed_at",
    "phone",
    "confirmed_at",
    "last_sign_in_at",
    "app_metadata",
    "user_metadata",
    "identities",
    "created_at",
    "updated_at",
    "is_anonymous",
}


@pytest.fixture
def user(db_url: str) -> uuid.UUID:
    with connect(db_url) as conn:
        row = conn.execute("insert into auth.users (email) values (%s) returning id", (EMAIL,)).fetchone()
    assert row is not None
    return uuid.UUID(str(row["id"]))


def get_user(gateway: Gateway, token: str | None) -> httpx.Response:
    headers = {"apikey": gateway.publishable_key, "X-Supabase-Api-Version": "2024-01-01"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return web.get(f"{gateway.url}/auth/v1/user", headers=headers)


def sign_in(gateway: Gateway, email: str, password: str) -> httpx.Response:
    return web.post(
        f"{gateway.url}/auth/v1/token?grant_type=password",
        json={"email": email, "password": password, "gotrue_meta_security": {}},
        headers={"apikey": gateway.publishable_key, "Authorization": f"Bearer {gateway.publishable_key}"},
    )


def test_get_user_answers_gotrues_user_object_from_auth_users(gateway: Gateway, user: uuid.UUID) -> None:
    answer = get_user(gateway, make_user_jwt(gateway.jwt_secret, user))
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == GOTRUE_USER_KEYS
    assert (body["id"], body["email"], body["aud"], body["role"]) == (
        str(user),
        EMAIL,
        "authenticated",
        "authenticated",
    )
    assert body["app_metadata"] == {"provider": "email", "providers": ["email"]}


def expired(gateway: Gateway, user: uuid.UUID) -> str:
    now = int(time.time())
    claims = {"sub": str(user), "role": "authenticated", "iat": now - 7200, "exp": now - 3600}
    return sign_jwt(gateway.jwt_secret, claims)


@pytest.mark.parametrize(
    ("token", "status", "error_code"),
    [
        (None, 401, "no_authorization"),
        ("expired", 403, "bad_jwt"),
        ("other-secret", 403, "bad_jwt"),
        ("unknown-user", 403, "user_not_found"),
    ],
)
def test_get_user_refuses_as_gotrue_does(
    gateway: Gateway, user: uuid.UUID, token: str | None, status: int, error_code: str
) -> None:
    tokens = {
        None: None,
        "expired": expired(gateway, user),
        "other-secret": make_user_jwt("not-the-projects-secret", user),
        "unknown-user": make_user_jwt(gateway.jwt_secret, uuid.uuid4()),
    }
    answer = get_user(gateway, tokens[token])
    assert answer.status_code == status
    assert answer.json()["error_code"] == error_code
    assert set(answer.json()) == {"code", "error_code", "msg"}


def test_the_password_grant_answers_a_session_whose_token_acts_as_the_user(
    gateway: Gateway, user: uuid.UUID
) -> None:
    answer = sign_in(gateway, EMAIL, gateway.local_password)
    assert answer.status_code == 200
    session = answer.json()
    assert {"access_token", "token_type", "expires_in", "expires_at", "refresh_token", "user"} <= set(session)
    assert (session["token_type"], session["expires_in"], session["user"]["id"]) == (
        "bearer",
        3600,
        str(user),
    )
    assert get_user(gateway, session["access_token"]).json()["id"] == str(user)


@pytest.mark.parametrize(("email", "password"), [(EMAIL, "wrong"), ("nobody@example.com", None)])
def test_the_password_grant_refuses_a_wrong_password_or_an_unknown_email_alike(
    gateway: Gateway, user: uuid.UUID, email: str, password: str | None
) -> None:
    answer = sign_in(gateway, email, password or gateway.local_password)
    assert (answer.status_code, answer.json()["error_code"]) == (400, "invalid_credentials")
    assert answer.json()["msg"] == "Invalid login credentials"


def test_auth_needs_the_api_key_as_supabases_gateway_does(gateway: Gateway, user: uuid.UUID) -> None:
    token = make_user_jwt(gateway.jwt_secret, user)
    answer = web.get(f"{gateway.url}/auth/v1/user", headers={"Authorization": f"Bearer {token}"})
    assert (answer.status_code, answer.json()["message"]) == (401, "No API key found in request")
