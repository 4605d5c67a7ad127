"""Supabase API keys: each kind is told apart, refused when it lacks the service role, and sent in
the headers Supabase accepts for it (seen at the gateway, through the jobs store's RPC client and the
real storage3 client)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from devstack.emulators.gateway import Gateway, make_jwt
from sona.deadline import Deadline
from sona.store.jobs import JobsStore
from sona.store.storage import AudioStorage, object_path
from sona.store.supabase_keys import KeyKind, SupabaseKey, classify, key_problem, key_warning, request_headers
from tests.support import make_settings, wav_bytes

JWT_SECRET = "a-jwt-secret-for-these-tests"
SERVICE_JWT = make_jwt(JWT_SECRET, "service_role")
ANON_JWT = make_jwt(JWT_SECRET, "anon")
SECRET = "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"
PUBLISHABLE = "sb_publishable_ACJWlzQHlZjBrEguHvfOxg_3BJgxAaH"


def jwt_with_payload(payload: bytes) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{b64(b'{}')}.{b64(payload)}.{b64(b'signature')}"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (SERVICE_JWT, SupabaseKey(kind=KeyKind.LEGACY_JWT, role="service_role")),
        (ANON_JWT, SupabaseKey(kind=KeyKind.LEGACY_JWT, role="anon")),
        (jwt_with_payload(json.dumps({"iss": "x"}).encode()), SupabaseKey(kind=KeyKind.LEGACY_JWT)),
        (SECRET, SupabaseKey(kind=KeyKind.SECRET)),
        (PUBLISHABLE, SupabaseKey(kind=KeyKind.PUBLISHABLE)),
        ("sentinel-service-key", SupabaseKey(kind=KeyKind.UNKNOWN)),
        (jwt_with_payload(b"not json"), SupabaseKey(kind=KeyKind.UNKNOWN)),
        (jwt_with_payload(b'["a list"]'), SupabaseKey(kind=KeyKind.UNKNOWN)),
        ("a.b", SupabaseKey(kind=KeyKind.UNKNOWN)),
    ],
)
def test_each_key_shape_is_told_apart_from_the_key_alone(key: str, expected: SupabaseKey) -> None:
    assert classify(key) == expected


@pytest.mark.parametrize(
    ("key", "bearer"),
    [(SERVICE_JWT, True), (ANON_JWT, True), (SECRET, False), (PUBLISHABLE, False), ("opaque", False)],
)
def test_only_a_jwt_goes_as_bearer_every_key_goes_as_apikey(key: str, bearer: bool) -> None:
    expected = {"apikey": key, **({"Authorization": f"Bearer {key}"} if bearer else {})}
    assert request_headers(key) == expected


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (PUBLISHABLE, "publishable key"),
        (ANON_JWT, "role 'anon'"),
        (make_jwt(JWT_SECRET, "authenticated"), "role 'authenticated'"),
        (jwt_with_payload(json.dumps({"iss": "x"}).encode()), "no service_role"),
    ],
)
def test_a_key_without_the_service_role_is_refused_with_the_reason(key: str, says: str) -> None:
    problem = key_problem(key)
    assert problem is not None
    assert says in problem
    assert "row level security" in problem and "pay for a second generation" in problem
    assert key not in problem


@pytest.mark.parametrize("key", [SERVICE_JWT, SECRET, "opaque-key-of-no-known-shape"])
def test_a_service_role_key_or_an_unknown_shape_is_not_refused(key: str) -> None:
    assert key_problem(key) is None


@pytest.mark.parametrize(("key", "warned"), [("opaque-key", True), (SERVICE_JWT, False), (SECRET, False)])
def test_only_a_key_of_unknown_shape_gets_a_warning(key: str, warned: bool) -> None:
    warning = key_warning(key)
    assert (warning is not None) == warned
    assert warning is None or key not in warning


def test_a_refused_key_makes_the_settings_invalid_without_echoing_it() -> None:
    from sona.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_settings(supabase_service_role_key=PUBLISHABLE)
    assert caught.value.problems[0].startswith("SUPABASE_SERVICE_ROLE_KEY is a publishable key")
    assert PUBLISHABLE not in str(caught.value)


@pytest.mark.parametrize("kind", ["legacy_jwt", "secret"])
def test_the_real_clients_send_each_key_kind_only_where_supabase_takes_it(
    gateway: Gateway, kind: str
) -> None:
    key = gateway.service_role_key if kind == "legacy_jwt" else gateway.secret_key
    settings = make_settings(supabase_url=gateway.url, supabase_service_role_key=key)
    AudioStorage._public.clear()
    storage = AudioStorage(settings)
    storage.ensure_bucket()
    path = object_path("generated", "job", datetime.now(UTC), "wav")
    storage.upload(path, wav_bytes(0.1), "wav", Deadline(30))
    assert storage.find_output("job") is None
    JobsStore(settings).stats(1)

    seen = list(gateway.seen_headers)
    routes = {route for route, _ in seen}
    assert {"storage:bucket_get", "storage:bucket_create", "storage:upload", "rpc:job_stats"} <= routes
    for _, headers in seen:
        assert headers.get("apikey") == key
        assert headers.get("authorization") == (f"Bearer {key}" if kind == "legacy_jwt" else None)
