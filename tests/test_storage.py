"""Storage through storage3 against the local gateway: paths, content types, upsert, URLs."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from devstack.emulators.gateway import Gateway
from sona.deadline import Deadline
from sona.errors import DeadlineExceeded, PermanentError, ServiceOutage, StorageUnavailable
from sona.store.storage import AudioStorage, BufferFile, object_path
from tests.support import make_settings, sql, web


@pytest.fixture(autouse=True)
def fresh_bucket_cache() -> None:
    AudioStorage._public.clear()


def storage(gateway: Gateway, **overrides: object) -> AudioStorage:
    """Most tests here use the earlier worker's public bucket; the privacy tests say otherwise."""
    return private_or_not(gateway, **{"storage_public": True, **overrides})


def private_or_not(gateway: Gateway, **overrides: object) -> AudioStorage:
    key = gateway.service_role_key
    return AudioStorage(make_settings(supabase_url=gateway.url, supabase_service_role_key=key, **overrides))


def test_object_paths_follow_prefix_job_and_timestamp() -> None:
    job = uuid.UUID(int=1)
    stamp = datetime(2026, 11, 28, 15, 4, 5, 123456, tzinfo=UTC)
    assert object_path("generated", job, stamp, "wav") == (
        "generated/00000000-0000-0000-0000-000000000001_20261128T150405123456Z.wav"
    )


@pytest.mark.parametrize(("overrides", "public"), [({}, False), ({"storage_public": True}, True)])
def test_the_bucket_is_created_once_private_unless_asked_with_no_size_limit_and_our_file_types(
    gateway: Gateway, db_url: str, overrides: dict[str, object], public: bool
) -> None:
    s = private_or_not(gateway, **overrides)
    s.ensure_bucket()
    s.ensure_bucket()
    bucket = sql(db_url, "select * from storage.buckets", role=None)
    assert [(b["id"], b["public"], b["file_size_limit"]) for b in bucket] == [("audio-files", public, None)]
    # the audio, and the waveform peaks beside it
    assert sorted(bucket[0]["allowed_mime_types"]) == ["application/json", "audio/mpeg", "audio/wav"]
    assert gateway.counts["storage:bucket_get"] == 1


@pytest.mark.parametrize(("setting", "stored"), [("50MB", 50_000_000), ("1.5kb", 1500), ("20B", 20)])
def test_a_configured_bucket_limit_is_sent_in_storages_decimal_bytes(
    gateway: Gateway, db_url: str, setting: str, stored: int
) -> None:
    storage(gateway, storage_file_size_limit=setting).ensure_bucket()
    assert sql(db_url, "select file_size_limit from storage.buckets", role=None) == [
        {"file_size_limit": stored}
    ]


def test_a_bucket_limit_above_the_projects_global_limit_is_a_service_outage_naming_both(
    gateway: Gateway, db_url: str
) -> None:
    # The gateway plays a Free plan project: a global upload limit of 50 MB.
    with pytest.raises(ServiceOutage) as caught:
        storage(gateway, storage_file_size_limit="100MB").ensure_bucket()
    assert "STORAGE_FILE_SIZE_LIMIT=100MB" in str(caught.value.detail)
    assert "global upload limit" in str(caught.value.detail)
    assert "larger" not in caught.value.public_message
    assert sql(db_url, "select id from storage.buckets", role=None) == []


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        ("413", "EntityTooLarge", "Payload too large"),
        ("400", "InvalidRequest", "Bad Request"),
        ("400", "InvalidBucketName", "Invalid Input"),
        ("415", "InvalidMimeType", "invalid_mime_type"),
    ],
)
def test_a_refused_bucket_creation_is_a_service_outage_not_the_jobs_fault(
    gateway: Gateway, status: str, code: str, error: str
) -> None:
    refusal = {"statusCode": status, "code": code, "error": error, "message": "refused"}
    gateway.faults.add("storage:bucket_create", 400, refusal)
    with pytest.raises(ServiceOutage, match="not set up"):
        storage(gateway).ensure_bucket()


@pytest.mark.parametrize("public", [True, False])
def test_urls_are_percent_encoded_and_download(gateway: Gateway, public: bool) -> None:
    s = storage(gateway, storage_path_prefix="my takes (v2)", storage_public=public)
    s.ensure_bucket()
    url = s.upload("my takes (v2)/a&b=1.wav", b"spaced", "wav", Deadline(10))
    kind = "public" if public else "sign"
    assert url.split("?")[0] == (
        f"{gateway.url}/storage/v1/object/{kind}/audio-files/my%20takes%20%28v2%29/a%26b%3D1.wav"
    )
    assert web.get(url).content == b"spaced"


@pytest.mark.parametrize(("ext", "content_type"), [("wav", "audio/wav"), ("mp3", "audio/mpeg")])
def test_uploads_land_with_their_content_type_and_the_public_url_serves_them(
    gateway: Gateway, ext: str, content_type: str
) -> None:
    s = storage(gateway)
    s.ensure_bucket()
    url = s.upload(f"generated/job.{ext}", b"audio bytes " + ext.encode(), ext, Deadline(10))
    assert url == f"{gateway.url}/storage/v1/object/public/audio-files/generated/job.{ext}"
    got = web.get(url)
    assert got.content == b"audio bytes " + ext.encode()
    assert got.headers["content-type"] == content_type
    assert (gateway.storage_dir / "audio-files" / "generated" / f"job.{ext}").exists()


def test_a_second_attempt_can_write_the_same_path(gateway: Gateway) -> None:
    s = storage(gateway)
    s.ensure_bucket()
    s.upload("generated/a.wav", b"first", "wav", Deadline(10))
    url = s.upload("generated/a.wav", b"second", "wav", Deadline(10))
    assert web.get(url).content == b"second"


def test_without_upsert_the_gateway_answers_storages_duplicate_error(gateway: Gateway) -> None:
    s = storage(gateway)
    s.ensure_bucket()
    s.upload("generated/a.wav", b"first", "wav", Deadline(10))
    response = web.post(
        f"{gateway.url}/storage/v1/object/audio-files/generated/a.wav",
        content=b"again",
        headers={"apikey": gateway.service_role_key, "content-type": "audio/wav"},
    )
    assert response.status_code == 400
    assert response.json() == {
        "statusCode": "409",
        "code": "KeyAlreadyExists",
        "error": "Duplicate",
        "message": "The resource already exists",
    }


def test_a_private_bucket_gets_signed_urls_that_download(gateway: Gateway) -> None:
    s = storage(gateway, storage_public=False, storage_signed_url_ttl_s=120)
    s.ensure_bucket()
    url = s.upload("generated/p.mp3", b"private", "mp3", Deadline(10))
    assert "/object/sign/audio-files/generated/p.mp3?token=" in url
    assert web.get(url).content == b"private"
    public = f"{gateway.url}/storage/v1/object/public/audio-files/generated/p.mp3"
    assert web.get(public).status_code == 400


def test_a_bytearray_is_uploaded_as_it_is_and_sent_again_whole_on_a_retry(gateway: Gateway) -> None:
    # The master is the engine's bytearray cut in place: storage3 would take anything but bytes or
    # a BufferedReader for a path, so it is streamed from the buffer, and a retry starts it over.
    s = storage(gateway, retry_delay_ms=40)
    s.ensure_bucket()
    data = bytearray(range(256)) * 1024  # 256 KiB: more than one of httpx's 64 KiB chunks
    gateway.faults.add("storage:upload", 500, {"statusCode": "500", "error": "internal", "message": "boom"})
    url = s.upload("generated/b.wav", data, "wav", Deadline(10))
    assert gateway.counts["storage:upload"] == 2
    got = web.get(url)
    assert got.content == bytes(data)
    assert got.headers["content-type"] == "audio/wav"


@pytest.mark.parametrize(
    ("moves", "read_after"),
    [
        ([], b"abcdef"),
        ([(2, os.SEEK_SET)], b"cdef"),
        ([(4, os.SEEK_SET), (-1, os.SEEK_CUR)], b"def"),
        ([(-2, os.SEEK_END)], b"ef"),
        ([(0, os.SEEK_END), (0, os.SEEK_SET)], b"abcdef"),
    ],
    ids=["from-the-start", "set", "back-from-current", "from-the-end", "rewound"],
)
def test_a_buffer_file_reads_and_seeks_like_a_file(moves: list[tuple[int, int]], read_after: bytes) -> None:
    file = io.BufferedReader(BufferFile(bytearray(b"abcdef")))
    for offset, whence in moves:
        file.seek(offset, whence)
    assert file.read() == read_after
    assert file.seek(0, os.SEEK_END) == 6


def test_a_5xx_is_retried_within_the_deadline(gateway: Gateway) -> None:
    s = storage(gateway, retry_delay_ms=40)
    s.ensure_bucket()
    gateway.faults.add("storage:upload", 500, {"statusCode": "500", "error": "internal", "message": "boom"})
    s.upload("generated/r.wav", b"data", "wav", Deadline(10))
    assert gateway.counts["storage:upload"] == 2


def test_payload_too_large_is_permanent(gateway: Gateway) -> None:
    s = storage(gateway, storage_file_size_limit="10B")
    s.ensure_bucket()
    with pytest.raises(PermanentError, match="larger than the storage allows"):
        s.upload("generated/big.wav", b"x" * 100, "wav", Deadline(10))
    assert gateway.counts["storage:upload"] == 1


def test_a_duplicate_answer_means_an_earlier_try_landed(gateway: Gateway) -> None:
    s = storage(gateway)
    s.ensure_bucket()
    gateway.faults.add(
        "storage:upload",
        400,
        {"statusCode": "409", "error": "Duplicate", "message": "The resource already exists"},
    )
    url = s.upload("generated/d.wav", b"data", "wav", Deadline(10))
    assert url.endswith("/generated/d.wav")
    assert gateway.counts["storage:upload"] == 1


def test_an_earlier_attempts_complete_output_is_found_by_its_mp3_metadata(gateway: Gateway) -> None:
    s = storage(gateway)
    s.ensure_bucket()
    job = uuid.uuid4()
    s.upload(f"generated/{job}_1.wav", b"only a wav: that attempt died before its mp3", "wav", Deadline(10))
    assert s.find_output(job) is None
    s.upload(f"generated/{job}_2.wav", b"wav", "wav", Deadline(10))
    s.upload(f"generated/{job}_2.mp3", b"mp3", "mp3", Deadline(10), {"sona_audio": {"duration_s": 2}})
    s.upload(f"generated/{uuid.uuid4()}_3.mp3", b"another job", "mp3", Deadline(10), {"sona_audio": {}})
    found = s.find_output(job)
    assert found is not None
    assert found.wav_url.endswith(f"/generated/{job}_2.wav")
    assert found.mp3_url.endswith(f"/generated/{job}_2.mp3")
    assert found.audio == {"duration_s": 2}


def test_a_slow_upload_ends_at_the_deadline_not_at_the_http_timeout(gateway: Gateway) -> None:
    s = storage(gateway)
    s.ensure_bucket()
    gateway.faults.add("storage:upload", 200, None, delay_s=4.0, delay_only=True)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        s.upload("generated/slow.wav", b"data", "wav", Deadline(1.0))
    assert time.monotonic() - started < 2.0


SLOW_BEFORE_PAYING = [
    ("storage:bucket_get", lambda s: s.ensure_bucket()),
    ("storage:list", lambda s: s.find_output(uuid.uuid4())),
]


@pytest.mark.parametrize(("route", "call"), SLOW_BEFORE_PAYING, ids=[r for r, _ in SLOW_BEFORE_PAYING])
def test_the_checks_before_paying_end_by_the_deadline_in_effect(
    gateway: Gateway, route: str, call: Callable[[AudioStorage], object]
) -> None:
    s = storage(gateway)
    gateway.faults.add(route, 200, None, delay_s=4.0, delay_only=True)
    started = time.monotonic()
    with Deadline(1.0).applies(), pytest.raises(DeadlineExceeded):
        call(s)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("status", ["401", "403"])
def test_storage_refusing_the_key_is_an_outage_tried_once(gateway: Gateway, status: str) -> None:
    s = storage(gateway)
    s.ensure_bucket()
    refusal = {
        "statusCode": status,
        "code": "AccessDenied",
        "error": "Unauthorized",
        "message": "Invalid Compact JWS",
    }
    gateway.faults.add("storage:upload", 400, refusal)
    with pytest.raises(ServiceOutage, match="refused the service's credentials") as caught:
        s.upload("generated/refused.wav", b"RIFF", "wav", Deadline(10))
    assert (caught.value.code, gateway.counts["storage:upload"]) == ("storage_refused", 1)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("503", StorageUnavailable),
        ("429", StorageUnavailable),
        ("403", ServiceOutage),
        ("404", PermanentError),
    ],
)
def test_reading_an_input_is_classed_like_every_storage_call(
    gateway: Gateway, status: str, kind: type[Exception]
) -> None:
    body = {"statusCode": status, "error": "e", "message": "m"}
    gateway.faults.add("storage:info", 400, body, times=5)
    with pytest.raises(kind) as caught:
        storage(gateway, max_retries=0).read_input(f"{uuid.uuid4()}/take.wav", Deadline(5))
    if status == "404":
        assert "not found" in str(caught.value)


@pytest.mark.parametrize(("bucket_public", "setting"), [(False, True), (True, False)])
def test_an_existing_buckets_own_privacy_decides_the_urls_whatever_the_setting(
    gateway: Gateway, db_url: str, bucket_public: bool, setting: bool
) -> None:
    # The plug-in's audio-files is private in production: it must never get public URLs
    # (docs/plugin-client.md).
    sql(
        db_url,
        "insert into storage.buckets (id, name, public) values ('audio-files', 'audio-files', %s)",
        bucket_public,
        role=None,
    )
    s = storage(gateway, storage_public=setting)
    s.ensure_bucket()
    url = s.upload(f"generated/{uuid.uuid4()}_1.wav", b"RIFF", "wav", Deadline(10))
    kind = "public" if bucket_public else "sign"
    assert f"/storage/v1/object/{kind}/audio-files/generated/" in url
    assert ("?token=" in url) is not bucket_public
    assert web.get(url).status_code == 200
    assert sql(db_url, "select public from storage.buckets", role=None) == [{"public": bucket_public}]


def test_expired_files_are_removed_and_a_name_already_gone_is_no_error(gateway: Gateway, db_url: str) -> None:
    s = storage(gateway)
    s.ensure_bucket()
    s.upload("generated/a_1.wav", b"RIFF", "wav", Deadline(10))
    s.remove(["generated/a_1.wav", "generated/never-there.json"])
    assert sql(db_url, "select name from storage.objects", role=None) == []


def test_a_bucket_turned_private_gets_signed_urls_from_the_next_instance(gateway: Gateway) -> None:
    """Issue 25, Storage 3: a bucket turned private answers its public URLs with "404"
    NoSuchBucket, so an instance that meets it private hands out signed URLs that download."""
    s = storage(gateway)
    s.ensure_bucket()
    assert "/object/public/" in s.upload("generated/before.mp3", b"before", "mp3", Deadline(10))
    turned = web.put(
        f"{gateway.url}/storage/v1/bucket/audio-files",
        json={"public": False},
        headers={"apikey": gateway.service_role_key},
    )
    assert turned.json() == {"message": "Successfully updated"}
    AudioStorage._public.clear()  # a new instance: its first job checks the bucket
    fresh = storage(gateway)  # STORAGE_PUBLIC still says public
    fresh.ensure_bucket()
    url = fresh.upload("generated/after.mp3", b"after", "mp3", Deadline(10))
    assert "/object/sign/audio-files/generated/after.mp3?token=" in url
    assert web.get(url).content == b"after"


def test_a_name_ending_in_a_slash_is_refused_for_good_and_tried_once(gateway: Gateway) -> None:
    """Issue 25, Storage 4: the real server refuses an upload to a folder name ("400"
    InvalidRequest "No content provided"); the client takes it as permanent, not as stored."""
    s = storage(gateway)
    s.ensure_bucket()
    with pytest.raises(PermanentError, match="could not be stored") as caught:
        s.upload("generated/", b"audio", "mp3", Deadline(10))
    assert (caught.value.detail, gateway.counts["storage:upload"]) == ("storage 400 InvalidRequest", 1)
