"""The inputs bucket's policies, as the local Storage applies them to a signed-in user's requests
(supabase-py's storage client, the anon key and the user's token), and the table's checks on the
columns the mode adds."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from storage3 import SyncStorageClient
from storage3.exceptions import StorageApiError

from devstack.emulators.gateway import Gateway, make_jwt
from devstack.emulators.user_jwt import make_user_jwt
from tests.support import connect, new_user, storage_client, wav_bytes

BUCKET = "audio-inputs"
SECRET = "local-jwt-secret-for-input-tests"


@pytest.fixture
def db_url(private_db_url: str) -> str:
    """A database of its own: the shared one is emptied per test, the migration's bucket with it."""
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


def as_user(gateway: Gateway, user_id: uuid.UUID, secret: str | None = None) -> SyncStorageClient:
    token = make_user_jwt(secret or gateway.jwt_secret, user_id)
    headers = {"apikey": gateway.anon_key, "Authorization": f"Bearer {token}"}
    return storage_client(f"{gateway.url}/storage/v1/", headers)


def upload(client: SyncStorageClient, path: str, data: bytes = b"") -> None:
    client.from_(BUCKET).upload(path, data or wav_bytes(0.1), {"content-type": "audio/wav"})


def test_the_inputs_bucket_is_private(gateway: Gateway, db_url: str) -> None:
    with connect(db_url) as conn:
        row = conn.execute("select public from storage.buckets where id = %s", (BUCKET,)).fetchone()
    assert row == {"public": False}


def test_a_user_uploads_reads_and_deletes_in_their_own_folder(gateway: Gateway, db_url: str) -> None:
    user = new_user(db_url)
    client = as_user(gateway, user)
    upload(client, f"{user}/take.wav", b"RIFF-not-checked-here")
    assert client.from_(BUCKET).download(f"{user}/take.wav") == b"RIFF-not-checked-here"
    removed = client.from_(BUCKET).remove([f"{user}/take.wav"])
    assert [r["name"] for r in removed] == [f"{user}/take.wav"]


@pytest.mark.parametrize("path", ["{other}/take.wav", "take.wav", "shared/take.wav"])
def test_a_user_cannot_upload_outside_their_folder(gateway: Gateway, db_url: str, path: str) -> None:
    user, other = new_user(db_url), new_user(db_url)
    with pytest.raises(StorageApiError) as refused:
        upload(as_user(gateway, user), path.format(other=other))
    assert (str(refused.value.status), refused.value.message) == (
        "403",
        "new row violates row-level security policy",
    )


def test_a_user_can_neither_read_nor_delete_another_users_input(gateway: Gateway, db_url: str) -> None:
    owner, intruder = new_user(db_url), new_user(db_url)
    upload(as_user(gateway, owner), f"{owner}/take.wav")
    bucket = as_user(gateway, intruder).from_(BUCKET)
    with pytest.raises(StorageApiError) as hidden:
        bucket.download(f"{owner}/take.wav")
    assert str(hidden.value.status) == "404"
    assert bucket.remove([f"{owner}/take.wav"]) == []
    assert as_user(gateway, owner).from_(BUCKET).download(f"{owner}/take.wav")  # still there


def test_a_token_not_signed_by_the_project_is_refused(gateway: Gateway, db_url: str) -> None:
    user = new_user(db_url)
    with pytest.raises(StorageApiError) as refused:
        upload(as_user(gateway, user, secret="someone-elses-secret"), f"{user}/take.wav")
    assert (str(refused.value.status), refused.value.message) == ("403", "invalid signature")


@pytest.mark.parametrize(
    ("columns", "constraint"),
    [
        ({"mode": "audio-to-audio"}, "jobs_audio_to_audio_input"),
        ({"mode": "audio-to-audio", "input_path": "x/y.wav", "strength": 1.2}, "jobs_strength_range"),
        ({"strength": -0.1}, "jobs_strength_range"),
    ],
)
def test_the_table_refuses_a_request_it_cannot_run(
    db_url: str, columns: dict[str, object], constraint: str
) -> None:
    user = new_user(db_url)
    names = ", ".join(["user_id", "prompt", *columns])
    marks = ", ".join(["%s"] * (2 + len(columns)))
    with (
        pytest.raises(psycopg.errors.CheckViolation, match=constraint),
        connect(db_url, "authenticated", user) as conn,
    ):
        conn.execute(
            f"insert into public.jobs ({names}) values ({marks})",  # type: ignore[arg-type]
            [user, "warm pad", *columns.values()],
        )


@pytest.mark.parametrize("mode", ["designer", "producer", "creator", "ambient"])
def test_the_table_takes_any_mode_and_the_function_decides(db_url: str, mode: str) -> None:
    # The plug-in charges tokens before it inserts: a mode is never a reason to refuse the row
    # (an unknown one fails its job with a message instead; docs/plugin-client.md).
    user = new_user(db_url)
    with connect(db_url, "authenticated", user) as conn:
        conn.execute(
            "insert into public.jobs (user_id, prompt, mode) values (%s, 'warm pad', %s)", [user, mode]
        )


def test_a_user_may_insert_the_new_request_columns(db_url: str) -> None:
    user = new_user(db_url)
    with connect(db_url, "authenticated", user) as conn:
        row = conn.execute(
            "insert into public.jobs (user_id, prompt, mode, input_path, strength)"
            " values (%s, 'warm pad', 'audio-to-audio', %s, 0.4) returning status, strength",
            (user, f"{user}/take.wav"),
        ).fetchone()
    assert row == {"status": "pending", "strength": 0.4}
