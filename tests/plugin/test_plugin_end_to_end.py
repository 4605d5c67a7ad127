"""The real client end to end, through real processes: the plug-in's database (its schema and rows,
tests/plugin/plugin_schema.sql) with this project's migrations on top, the local Supabase gateway,
the webhook relay, the local Cloud Tasks and both functions under functions-framework. `generate`'s
charge-then-insert is replayed exactly (docs/plugin-client.md), then the plug-in's UI does what it does as the
owner: polls `select *`, signs `preview_path`, plays it, lists "My Sounds"; an admin and the anon
showcase read; the daily cleanup lets the files go."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests

from devstack.stack import TERMINAL, LocalStack
from tests.plugin.generate import GenerateRequest, generate_through_gateway
from tests.plugin.plugin_db import (
    ADMIN,
    AUDIO_BUCKET,
    MUSICIAN,
    OLD_PENDING,
    PROCESSING_PRODUCER,
    QUEUED_DESIGNER,
    admin_reads_jobs,
    cleanup_selection,
    fetch_signed,
    my_sounds,
    owner_reads_job,
    plugin_stack,
    showcase,
    sign_preview,
)
from tests.support import decoded_seconds, sql
from tests.test_reclaim import reclaim

pytestmark = pytest.mark.slow

# (request, the prompt the provider must be sent): docs/plugin-client.md's table of the three modes.
REQUESTS: dict[str, tuple[GenerateRequest, str]] = {
    "designer": (
        GenerateRequest("metal door slam in a big hall", duration=4, quality="high", mode="designer"),
        "metal door slam in a big hall. very short",
    ),
    "producer": (
        GenerateRequest(
            "lofi hip hop drum loop with tape hiss",
            duration=8,
            quality="medium",
            mode="producer",
            key="F",
            scale="minor",
            bpm=84,
            time_signature="4/4",
            bars=4,
        ),
        "lofi hip hop drum loop with tape hiss. 84 BPM, F minor, 4/4 time, 4 bars, 8 seconds",
    ),
    "creator (120 s)": (
        GenerateRequest(
            "epic orchestral trailer music",
            duration=120,
            quality="low",
            mode="creator",
            key="D",
            scale="minor",
            bpm=100,
            user_email="jaime@example.com",
        ),
        "epic orchestral trailer music. 100 BPM, D minor, 2 minutes",
    ),
}
GENERATED: dict[str, uuid.UUID] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    with plugin_stack(tmp_path_factory.mktemp("plugin-stack"), pg_server, {}) as running:
        yield running


def follow_as_owner(stack: LocalStack, job_id: uuid.UUID, timeout_s: float = 120) -> list[dict[str, Any]]:
    """The UI's poll: `select *` of its job as the owner, until completed or failed."""
    seen: list[dict[str, Any]] = []

    def ended() -> bool:
        row = owner_reads_job(stack.database_url, MUSICIAN, job_id)
        assert row is not None
        if not seen or seen[-1]["status"] != row["status"]:
            seen.append(row)
        return row["status"] in TERMINAL

    # Read again at each commit the database reports (the UI polls; this sees every status it could).
    stack.wait_until(ended, timeout_s, f"job {job_id} to end as its owner reads it")
    return seen


@pytest.mark.parametrize("name", list(REQUESTS))
def test_a_job_generate_inserts_completes_with_what_the_player_reads(stack: LocalStack, name: str) -> None:
    request, prompt = REQUESTS[name]
    answer = generate_through_gateway(stack.gateway, MUSICIAN, request)
    assert answer.status == 201, answer.error
    assert answer.job is not None
    job_id = uuid.UUID(answer.job["id"])
    GENERATED[name] = job_id

    seen = follow_as_owner(stack, job_id)

    assert {r["status"] for r in seen} <= {"queued", "processing", "completed"}  # what the UI knows
    row = seen[-1]
    assert row["status"] == "completed", row["error_message"]
    assert row["mode"] == request.mode
    assert row["enhanced_prompt"] == prompt
    assert row["master_path"].endswith(".wav") and row["preview_path"].endswith(".mp3")
    assert row["filename"]
    call = next(c for c in stack.double.calls if c.fields.get("prompt") == prompt)  # type: ignore[union-attr]
    assert call.fields["duration"] == str(request.duration)
    # A private bucket never gets public URLs: the earlier worker's columns hold signed ones.
    assert "/object/sign/" in row["mp3_url"] and row["result_url"] == row["mp3_url"]


@pytest.mark.parametrize("name", list(REQUESTS))
def test_the_owner_signs_the_preview_and_plays_it(stack: LocalStack, name: str) -> None:
    row = owner_reads_job(stack.database_url, MUSICIAN, GENERATED[name])
    assert row is not None
    signed = sign_preview(stack.gateway, MUSICIAN, row["preview_path"])
    assert signed.status_code == 200, signed.text
    played = fetch_signed(stack.gateway, signed.json()["signedURL"])
    assert played.status_code == 200
    assert played.headers["content-type"].startswith("audio/mpeg")
    request = REQUESTS[name][0]
    assert decoded_seconds(played.content, ".mp3") == pytest.approx(request.duration, abs=0.2)


def test_another_musician_cannot_sign_the_preview(stack: LocalStack) -> None:
    other = stack.create_user()
    row = owner_reads_job(stack.database_url, MUSICIAN, GENERATED["designer"])
    assert row is not None
    assert sign_preview(stack.gateway, other, row["preview_path"]).status_code == 400


def test_my_sounds_the_admin_and_the_showcase_read_as_the_plugin_does(stack: LocalStack) -> None:
    url = stack.database_url
    assert set(GENERATED.values()) <= {r["id"] for r in my_sounds(url, MUSICIAN)}
    assert set(GENERATED.values()) <= {r["id"] for r in admin_reads_jobs(url, ADMIN)}
    assert not set(GENERATED.values()) & {r["id"] for r in showcase(url)}  # not shared


def test_the_old_workers_lock_takes_nothing_while_this_stack_runs(stack: LocalStack) -> None:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute("set role service_role")
        taken = conn.execute(
            "update jobs set status = 'processing', updated_at = now()"
            " where id = %s and status = 'queued' returning id",
            (QUEUED_DESIGNER,),
        ).fetchall()
    assert taken == []


def test_reclaim_serves_the_rows_waiting_in_the_database_and_leaves_the_old_workers_to_it(
    stack: LocalStack,
) -> None:
    reclaim(stack)
    rows = {r: stack.wait_for(r, timeout_s=60) for r in (QUEUED_DESIGNER, OLD_PENDING)}
    assert rows[QUEUED_DESIGNER]["status"] == "completed", rows[QUEUED_DESIGNER]["error_message"]
    assert rows[OLD_PENDING]["status"] == "failed"  # its free-text mode 'ambient'
    assert "mode is not supported" in rows[OLD_PENDING]["error_message"]
    # Taken by the old worker five minutes ago (processing, no lease): still its own.
    assert stack.job(PROCESSING_PRODUCER)["status"] == "processing"


def test_a_job_the_old_worker_held_for_over_an_hour_fails_and_is_never_generated(stack: LocalStack) -> None:
    job = PROCESSING_PRODUCER
    backdate = f"update public.jobs set updated_at = now() - interval '61 minutes' where id = '{job}'"
    sql(stack.database_url, "select sona_backfill_jobs(%s)", backdate, role=None)
    calls = stack.double.call_count  # type: ignore[union-attr]
    reclaim(stack)
    row = stack.job(PROCESSING_PRODUCER)
    assert (row["status"], row["attempts"], row["error_message"]) == (
        "failed",
        0,
        "The job did not finish; please try again.",
    )
    assert stack.double.call_count == calls  # type: ignore[union-attr]


def test_after_the_plugins_daily_cleanup_reclaim_deletes_every_file_peaks_included(stack: LocalStack) -> None:
    url = stack.database_url
    job_id = GENERATED["designer"]
    sql(
        url,
        "select sona_backfill_jobs(%s)",
        f"update public.jobs set completed_at = now() - interval '25 hours' where id = '{job_id}'",
        role=None,
    )
    selected = {r["id"]: r for r in cleanup_selection(url)}
    assert job_id in selected
    names = [selected[job_id]["master_path"], selected[job_id]["preview_path"]]
    # What cleanup-expired-audio then does with the service role: remove both objects, clear the paths.
    service = {"apikey": stack.service_role_key, "Authorization": f"Bearer {stack.service_role_key}"}
    removed = requests.delete(
        f"{stack.supabase_url}/storage/v1/object/{AUDIO_BUCKET}",
        json={"prefixes": names},
        headers=service,
        timeout=10,
    )
    assert removed.status_code == 200, removed.text
    sql(
        url,
        "update jobs set master_path = null, preview_path = null, updated_at = now() where id = %s",
        job_id,
    )
    # A cleared path's files wait a day (storage_delete_delay_seconds), in case it was a mistake.
    assert reclaim(stack) is not None
    assert (
        sql(url, "select name from storage.objects where name like %s", f"%{job_id}%.json", role=None) != []
    )
    sql(url, "update sona_storage_garbage set due_at = now() where name like %s", f"%{job_id}%", role=None)

    reclaim(stack)

    left = sql(url, "select name from storage.objects where name like %s", f"%{job_id}%", role=None)
    assert left == []
    assert owner_reads_job(url, MUSICIAN, job_id)["peaks_url"] is None  # type: ignore[index]
