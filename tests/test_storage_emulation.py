"""The local Storage answers as the real Storage server (v1.70.6) does: error bodies with Storage's
ErrorCode names, the project's global upload limit, decimal size units, its key rules, listing and
download headers. Each case cites what it follows in supabase/storage."""

from __future__ import annotations

import hashlib
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from devstack.emulators.gateway import Gateway
from devstack.emulators.storage_api import FREE_PLAN_UPLOAD_LIMIT
from tests.support import web

BUCKET = "audio-files"


def call(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"apikey": gw.service_role_key, "Authorization": f"Bearer {gw.service_role_key}"}
    return web.request(method, f"{gw.url}/storage/v1/{path}", headers=headers, **kwargs)


def create_bucket(gw: Gateway, **options: Any) -> httpx.Response:
    return call(gw, "POST", "bucket", json={"id": BUCKET, "name": BUCKET, "public": True, **options})


def upload(gw: Gateway, name: str, data: bytes = b"audio") -> httpx.Response:
    return call(
        gw,
        "POST",
        f"object/{BUCKET}/{quote(name)}",
        files={"file": ("f", data, "audio/wav")},
        data={"cacheControl": "3600"},
    )


def listing(gw: Gateway, bucket: str = BUCKET, **body: Any) -> Any:
    response = call(gw, "POST", f"object/list/{bucket}", json={"prefix": "", **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_default_global_upload_limit_is_the_free_plans(gateway: Gateway) -> None:
    assert gateway.storage.upload_limit == FREE_PLAN_UPLOAD_LIMIT == 52_428_800


def test_a_bucket_limit_above_the_global_limit_is_refused_with_413_entity_too_large(
    gateway: Gateway,
) -> None:
    response = create_bucket(gateway, file_size_limit="100MB")
    assert response.status_code == 400
    assert response.json() == {
        "statusCode": "413",
        "code": "EntityTooLarge",
        "error": "Payload too large",
        "message": "The object exceeded the maximum allowed size",
    }


@pytest.mark.parametrize(
    ("limit", "stored"),
    [("50MB", 50_000_000), ("1.5kb", 1_500), (1234, 1234), (None, None)],
)
def test_bucket_limits_are_stored_in_decimal_bytes(gateway: Gateway, limit: Any, stored: int | None) -> None:
    assert create_bucket(gateway, file_size_limit=limit).status_code == 200
    assert call(gateway, "GET", f"bucket/{BUCKET}").json()["file_size_limit"] == stored


@pytest.mark.parametrize("limit", ["100 MB", "100", "1e3MB", "-1MB"])
def test_a_size_string_storage_cannot_parse_is_an_invalid_request(gateway: Gateway, limit: str) -> None:
    response = create_bucket(gateway, file_size_limit=limit)
    assert (response.status_code, response.json()["statusCode"], response.json()["code"]) == (
        400,
        "400",
        "InvalidRequest",
    )


def test_the_global_limit_caps_uploads_to_a_bucket_without_a_limit(gateway: Gateway) -> None:
    gateway.storage.upload_limit = 1000
    create_bucket(gateway)
    assert upload(gateway, "ok.wav", b"x" * 1000).status_code == 200
    refused = upload(gateway, "big.wav", b"x" * 1001)
    assert (refused.status_code, refused.json()["code"]) == (400, "EntityTooLarge")


@pytest.mark.parametrize(
    ("request_args", "status", "code", "error"),
    [
        (("GET", "bucket/missing"), "404", "NoSuchBucket", "Bucket not found"),
        (("POST", "object/info/audio-files/none.wav"), "404", "NoSuchKey", "not_found"),
        (("POST", "object/sign/audio-files/none.wav", {"expiresIn": 60}), "404", "NoSuchKey", "not_found"),
        (("POST", "bucket", {"name": "a/b"}), "400", "InvalidBucketName", "Invalid Input"),
        (("POST", "bucket", {"name": BUCKET}), "409", "BucketAlreadyExists", "Duplicate"),
    ],
)
def test_errors_carry_storages_code(
    gateway: Gateway, request_args: tuple[Any, ...], status: str, code: str, error: str
) -> None:
    create_bucket(gateway)
    method, path, *body = request_args
    response = call(gateway, method, path, json=body[0] if body else None)
    assert response.status_code == 400
    assert (response.json()["statusCode"], response.json()["code"], response.json()["error"]) == (
        status,
        code,
        error,
    )


@pytest.mark.parametrize("name", ["tracks/ünï.wav", "a#b.wav", "a\\b.wav", "a%20b.wav", "a[1].wav", "a|b"])
def test_names_storage_refuses_are_invalid_keys(gateway: Gateway, name: str) -> None:
    create_bucket(gateway)
    response = upload(gateway, name)
    assert response.status_code == 400
    assert response.json() == {
        "statusCode": "400",
        "code": "InvalidKey",
        "error": "InvalidKey",
        "message": f"Invalid key: {name}",
    }


def test_listing_a_missing_bucket_answers_an_empty_list(gateway: Gateway) -> None:
    assert listing(gateway, "no-such-bucket") == []


def test_the_list_search_is_a_case_insensitive_prefix_with_no_wildcards(gateway: Gateway) -> None:
    create_bucket(gateway)
    for name in ("g/Job_1.wav", "g/job_2.mp3", "g/jobX3.wav", "g/other.wav", "g/job_4/deeper.wav"):
        assert upload(gateway, name).status_code == 200
    found = listing(gateway, prefix="g", search="JOB_", sortBy={"column": "name", "order": "desc"})
    assert [(item["name"], item["id"] is None) for item in found] == [
        ("job_4", True),  # a folder: a row with no id
        ("job_2.mp3", False),
        ("Job_1.wav", False),
    ]


def test_signed_downloads_carry_expires_and_no_cache_control(gateway: Gateway) -> None:
    create_bucket(gateway)
    upload(gateway, "s.wav")
    signed = call(gateway, "POST", f"object/sign/{BUCKET}/s.wav", json={"expiresIn": 120})
    response = web.get(f"{gateway.url}/storage/v1{signed.json()['signedURL']}")
    assert response.status_code == 200
    assert "cache-control" not in response.headers
    assert parsedate_to_datetime(response.headers["expires"]).timestamp() > 0


def test_public_downloads_carry_cache_headers_and_answer_304_and_ranges(gateway: Gateway) -> None:
    create_bucket(gateway)
    upload(gateway, "p.wav", b"0123456789")
    url = f"{gateway.url}/storage/v1/object/public/{BUCKET}/p.wav"
    first = web.get(url)
    assert first.headers["cache-control"] == "max-age=3600"
    assert "last-modified" in first.headers
    again = web.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    part = web.get(url, headers={"Range": "bytes=2-4"})
    assert (part.status_code, part.content, part.headers["content-range"]) == (206, b"234", "bytes 2-4/10")


# An upload's body is streamed into a spool file beside the objects and renamed into place
# (devstack/emulators/storage_uploads.py): what is stored must be exactly what was sent.
BODY = bytes(range(256)) * 4099  # 1 MB and a bit: many of the parser's reads, not a multiple of them


@pytest.mark.parametrize(
    ("kind", "send"),
    [
        ("multipart form", {"files": {"file": ("f", BODY, "audio/wav")}, "data": {"cacheControl": "60"}}),
        (
            "raw body",
            {"content": BODY, "headers": {"content-type": "audio/wav", "cache-control": "max-age=60"}},
        ),
    ],
)
def test_an_upload_stores_its_bytes_with_their_md5_etag_and_size(
    gateway: Gateway, kind: str, send: dict[str, Any]
) -> None:
    create_bucket(gateway)
    headers = {"apikey": gateway.service_role_key, "Authorization": f"Bearer {gateway.service_role_key}"}
    url = f"{gateway.url}/storage/v1/object/{BUCKET}/body.wav"
    stored = web.request("POST", url, **{**send, "headers": {**headers, **send.get("headers", {})}})
    assert stored.status_code == 200, stored.text
    [listed] = listing(gateway)
    md5 = hashlib.md5(BODY, usedforsecurity=False).hexdigest()
    assert (listed["metadata"]["eTag"], listed["metadata"]["size"]) == (f'"{md5}"', len(BODY))
    assert listed["metadata"]["cacheControl"] == "max-age=60"
    downloaded = web.get(f"{gateway.url}/storage/v1/object/public/{BUCKET}/body.wav")
    assert (downloaded.content == BODY, downloaded.headers["etag"]) == (True, f'"{md5}"')


@pytest.mark.parametrize(
    ("refusal", "name", "send", "code"),
    [
        ("over the limit", "big.wav", {"files": {"file": ("f", b"x" * 1001, "audio/wav")}}, "EntityTooLarge"),
        (
            "a type the bucket refuses",
            "t.txt",
            {"files": {"file": ("f", b"text", "text/plain")}},
            "InvalidMimeType",
        ),
        ("an invalid key", "a#b.wav", {"files": {"file": ("f", b"audio", "audio/wav")}}, "InvalidKey"),
        (
            "metadata that is not JSON",
            "m.wav",
            {"files": {"file": ("f", b"a", "audio/wav")}, "data": {"metadata": "{"}},
            "InvalidRequest",
        ),
        (
            "an existing name without upsert",
            "kept.wav",
            {"files": {"file": ("f", b"again", "audio/wav")}},
            "KeyAlreadyExists",
        ),
    ],
)
def test_a_refused_upload_leaves_nothing_in_the_storage_folder(
    gateway: Gateway, refusal: str, name: str, send: dict[str, Any], code: str
) -> None:
    create_bucket(gateway, allowed_mime_types=["audio/*"])
    assert upload(gateway, "kept.wav", b"first").status_code == 200
    gateway.storage.upload_limit = 1000
    before = sorted(p.relative_to(gateway.storage_dir) for p in gateway.storage_dir.rglob("*"))
    refused = call(gateway, "POST", f"object/{BUCKET}/{quote(name)}", **send)
    assert (refused.status_code, refused.json()["code"]) == (400, code), refusal
    assert sorted(p.relative_to(gateway.storage_dir) for p in gateway.storage_dir.rglob("*")) == before
    assert web.get(f"{gateway.url}/storage/v1/object/public/{BUCKET}/kept.wav").content == b"first"
