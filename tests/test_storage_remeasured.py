"""The local Storage against the real Storage server (v1.70.6), measured again (issue 25, "Storage:
where the emulation is wrong"). Each test names the item it holds the emulation to; each failed on
the emulation as it was. The plug-in's player is items 1 and 2: its policy lets the owner read an
object in the private bucket `audio-files` only when the name is their job's `master_path` or
`preview_path` (docs/plugin-client.md)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from storage3 import SyncStorageClient

from devstack.emulators.gateway import Gateway, make_jwt
from devstack.emulators.user_jwt import check_jwt, make_user_jwt
from sona.deadline import Deadline
from sona.store.storage import AudioStorage
from tests.support import connect, insert_job, make_settings, new_user, storage_client, web

BUCKET = "audio-files"
SECRET = "local-jwt-secret-for-storage-remeasured"

# The plug-in's storage policy on its private bucket, in this project's words (docs/plugin-client.md); the two
# path columns are made in the dashboard on the plug-in's database, so the test makes them here.
PLAYER_POLICY = """
alter table public.jobs add column if not exists master_path text;
alter table public.jobs add column if not exists preview_path text;
create policy player_reads_own_audio on storage.objects for select to authenticated using (
  bucket_id = 'audio-files' and exists (
    select 1 from public.jobs j
     where j.user_id = auth.uid() and storage.objects.name in (j.master_path, j.preview_path)));
"""


@pytest.fixture
def db_url(private_db_url: str) -> str:
    """A database of its own: these tests add the plug-in's policy and columns."""
    with connect(private_db_url) as conn:
        conn.execute(PLAYER_POLICY)  # type: ignore[arg-type]
    return private_db_url


@pytest.fixture
def gateway(db_url: str, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(
        db_url,
        tmp_path / "storage",
        service_role_key=make_jwt(SECRET, "service_role"),
        anon_key=make_jwt(SECRET, "anon"),
        jwt_secret=SECRET,
    )
    gw.start()
    yield gw
    gw.stop()


def service(gw: Gateway) -> SyncStorageClient:
    headers = {"apikey": gw.service_role_key, "Authorization": f"Bearer {gw.service_role_key}"}
    return storage_client(f"{gw.url}/storage/v1/", headers)


def as_user(gw: Gateway, user_id: uuid.UUID) -> SyncStorageClient:
    """The plug-in's client: the anon key and the user's access token."""
    token = make_user_jwt(gw.jwt_secret, user_id)
    return storage_client(f"{gw.url}/storage/v1/", {"apikey": gw.anon_key, "Authorization": f"Bearer {token}"}
    )


def call(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"apikey": gw.service_role_key, "Authorization": f"Bearer {gw.service_role_key}"}
    return web.request(
        method, f"{gw.url}/storage/v1/{path}", headers={**headers, **kwargs.pop("headers", {})}, **kwargs
    )


def error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["statusCode"], body["code"]


@pytest.fixture
def player(gateway: Gateway, db_url: str) -> dict[str, Any]:
    """A private bucket holding one user's finished job (its WAV and MP3, named on the row) and
    another user's MP3, stored with the service role as the worker stores them."""
    service(gateway).create_bucket(BUCKET, options={"public": False})
    owner, other = new_user(db_url), new_user(db_url)
    paths = {}
    for user, name in ((owner, "mine"), (other, "theirs")):
        master, preview = f"generated/{name}.wav", f"generated/{name}.mp3"
        insert_job(db_url, user_id=user, master_path=master, preview_path=preview)
        for path, data in ((master, b"RIFF" + name.encode()), (preview, b"ID3" + name.encode())):
            service(gateway).from_(BUCKET).upload(path, data, {"content-type": "audio/mpeg"})
        paths[name] = preview
    return {"owner": owner, "other": other, **paths}


# -- 1. a signed-in user signing their own object -------------------------------------------------
def test_1_the_owner_signs_their_preview_under_the_players_select_policy_and_it_downloads(
    gateway: Gateway, player: dict[str, Any]
) -> None:
    signed = as_user(gateway, player["owner"]).from_(BUCKET).create_signed_url(player["mine"], 3600)
    assert web.get(signed["signedURL"]).content == b"ID3mine"


@pytest.mark.parametrize("name", ["generated/theirs.mp3", "generated/nothing.mp3"])
def test_1_signing_another_users_object_or_a_missing_one_is_no_such_key(
    gateway: Gateway, player: dict[str, Any], name: str
) -> None:
    token = make_user_jwt(gateway.jwt_secret, player["owner"])
    refused = call(
        gateway,
        "POST",
        f"object/sign/{BUCKET}/{name}",
        json={"expiresIn": 3600},
        headers={"apikey": gateway.anon_key, "Authorization": f"Bearer {token}"},
    )
    assert error(refused) == (400, "404", "NoSuchKey")


def test_1_the_owner_signs_and_plays_what_the_worker_stored_for_their_job(
    gateway: Gateway, db_url: str
) -> None:
    """The production path: the worker stores the MP3 with the service role (sona/store/storage.py, into
    the private bucket); the job's row names it; its owner signs it under the player's policy."""
    AudioStorage._public.clear()
    settings = make_settings(
        supabase_url=gateway.url, supabase_service_role_key=gateway.service_role_key, storage_public=False
    )
    worker = AudioStorage(settings)
    worker.ensure_bucket()
    owner = new_user(db_url)
    path = f"generated/{uuid.uuid4()}_1.mp3"
    worker.upload(path, b"ID3 preview", "mp3", Deadline(10))
    insert_job(db_url, user_id=owner, preview_path=path)
    signed = as_user(gateway, owner).from_(BUCKET).create_signed_url(path, 3600)
    assert web.get(signed["signedURL"]).content == b"ID3 preview"


# -- 2. a signed-in user listing their own folder --------------------------------------------------
def test_2_a_user_lists_what_the_select_policy_lets_them_see(
    gateway: Gateway, player: dict[str, Any]
) -> None:
    listed = as_user(gateway, player["owner"]).from_(BUCKET).list("generated")
    assert sorted(item["name"] for item in listed) == ["mine.mp3", "mine.wav"]


# -- 3. a bucket turned private --------------------------------------------------------------------
def test_3_a_bucket_turned_private_answers_successfully_updated_and_stops_serving_public_urls(
    gateway: Gateway,
) -> None:
    service(gateway).create_bucket(BUCKET, options={"public": True})
    service(gateway).from_(BUCKET).upload("p.mp3", b"ID3", {"content-type": "audio/mpeg"})
    public_url = f"{gateway.url}/storage/v1/object/public/{BUCKET}/p.mp3"
    assert web.get(public_url).status_code == 200
    updated = call(gateway, "PUT", f"bucket/{BUCKET}", json={"public": False})
    assert (updated.status_code, updated.json()) == (200, {"message": "Successfully updated"})
    assert service(gateway).get_bucket(BUCKET).public is False
    assert error(web.get(public_url)) == (400, "404", "NoSuchBucket")


# -- 6. error codes --------------------------------------------------------------------------------
def test_6_object_info_in_a_missing_bucket_is_no_such_bucket(gateway: Gateway) -> None:
    assert error(call(gateway, "GET", "object/info/no-such-bucket/a.mp3")) == (400, "404", "NoSuchBucket")


@pytest.fixture
def signed_path(gateway: Gateway) -> str:
    service(gateway).create_bucket(BUCKET, options={"public": False})
    service(gateway).from_(BUCKET).upload("s.mp3", b"ID3", {"content-type": "audio/mpeg"})
    return str(
        call(gateway, "POST", f"object/sign/{BUCKET}/s.mp3", json={"expiresIn": 60}).json()["signedURL"]
    )


def test_6_a_signed_urls_token_is_a_jwt_of_the_url_signed_with_the_projects_secret(
    gateway: Gateway, signed_path: str
) -> None:
    claims, problem = check_jwt(signed_path.split("token=", 1)[1], SECRET)
    assert problem is None and claims is not None
    assert claims["url"] == f"{BUCKET}/s.mp3"
    assert claims["exp"] - claims["iat"] == 60


def test_6_a_tampered_token_is_invalid_jwt(gateway: Gateway, signed_path: str) -> None:
    path, token = signed_path.split("?token=", 1)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "exp": claims["exp"] + 10**6}).encode())
    tampered = ".".join((header, forged.rstrip(b"=").decode(), signature))
    assert error(web.get(f"{gateway.url}/storage/v1{path}?token={tampered}")) == (400, "400", "InvalidJWT")


def test_6_a_signed_url_without_a_token_is_an_invalid_request(gateway: Gateway, signed_path: str) -> None:
    response = web.get(f"{gateway.url}/storage/v1{signed_path.split('?', 1)[0]}")
    assert error(response) == (400, "400", "InvalidRequest")
    assert response.json()["message"] == "querystring must have required property 'token'"


# -- 7. object fields ------------------------------------------------------------------------------
@pytest.fixture
def bucket(gateway: Gateway) -> SyncStorageClient:
    service(gateway).create_bucket(BUCKET, options={"public": True})
    return service(gateway)


def info(gateway: Gateway, name: str) -> httpx.Response:
    response = call(gateway, "GET", f"object/info/{BUCKET}/{name}")
    assert response.status_code == 200, response.text
    return response


def test_7_every_overwrite_stores_a_new_version_never_the_id(
    gateway: Gateway, bucket: SyncStorageClient
) -> None:
    versions = []
    for data in (b"one", b"two"):
        bucket.from_(BUCKET).upload("v.mp3", data, {"content-type": "audio/mpeg", "upsert": "true"})
        body = info(gateway, "v.mp3").json()
        uuid.UUID(body["version"])
        assert body["version"] != body["id"]
        versions.append(body["version"])
    assert versions[0] != versions[1]


def test_7_an_upload_without_a_cache_time_is_stored_no_cache(
    gateway: Gateway, bucket: SyncStorageClient
) -> None:
    response = call(
        gateway, "POST", f"object/{BUCKET}/raw.mp3", content=b"ID3", headers={"content-type": "audio/mpeg"}
    )
    assert response.status_code == 200
    form = call(gateway, "POST", f"object/{BUCKET}/form.mp3", files={"file": ("f", b"ID3", "audio/mpeg")})
    assert form.status_code == 200
    assert [info(gateway, n).json()["cache_control"] for n in ("raw.mp3", "form.mp3")] == ["no-cache"] * 2


def test_7_object_info_has_empty_user_metadata_and_the_cache_headers(
    gateway: Gateway, bucket: SyncStorageClient
) -> None:
    bucket.from_(BUCKET).upload("i.mp3", b"ID3", {"content-type": "audio/mpeg", "cache-control": "60"})
    response = info(gateway, "i.mp3")
    assert response.json()["metadata"] == {}
    assert response.headers["cache-control"] == "max-age=60"
    assert response.headers["etag"] == response.json()["etag"]
    assert "last-modified" in response.headers


def test_7_listed_metadata_has_the_real_servers_fields(gateway: Gateway, bucket: SyncStorageClient) -> None:
    bucket.from_(BUCKET).upload("l.mp3", b"ID3!", {"content-type": "audio/mpeg"})
    [item] = bucket.from_(BUCKET).list("")
    assert set(item["metadata"]) == {
        "eTag",
        "size",
        "mimetype",
        "cacheControl",
        "lastModified",
        "contentLength",
        "httpStatusCode",
    }
    assert (item["metadata"]["contentLength"], item["metadata"]["httpStatusCode"]) == (4, 200)


def test_7_a_missing_object_is_object_not_found(gateway: Gateway, bucket: SyncStorageClient) -> None:
    response = call(gateway, "GET", f"object/{BUCKET}/missing.mp3")
    assert error(response) == (400, "404", "NoSuchKey")
    assert response.json()["message"] == "Object not found"


# -- 4. a name ending in / ----------------------------------------------------------------------------
def test_4_an_upload_to_a_name_ending_in_a_slash_is_refused(
    gateway: Gateway, bucket: SyncStorageClient
) -> None:
    response = call(gateway, "POST", f"object/{BUCKET}/folder/", files={"file": ("f", b"x", "audio/mpeg")})
    assert error(response) == (400, "400", "InvalidRequest")
    assert response.json()["message"] == "No content provided"
    assert bucket.from_(BUCKET).list("") == []


# -- 5. an update of a missing name ------------------------------------------------------------------
def test_5_an_update_of_a_missing_name_creates_it(gateway: Gateway, bucket: SyncStorageClient) -> None:
    bucket.from_(BUCKET).update("new.mp3", b"ID3new", {"content-type": "audio/mpeg"})
    assert web.get(f"{gateway.url}/storage/v1/object/public/{BUCKET}/new.mp3").content == b"ID3new"
