"""The rules supabase/schemas/ has for the plug-in's rows (docs/plugin-client.md), in SQL: the
status a waiting job shows, the UI's quality names, unforgeable results, the cutover from the
plug-in's old worker, what complete_job writes for the player, and the files retention lets go."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from tests.support import connect, insert_job, job_row, new_user, reclaim_actions, reclaimed, sql
from tests.test_state_machine import BASE_MS, CAP_MS, MAX_ATTEMPTS, claim, fail

OUTAGE = ("provider_out_of_credits", "no credits", "The audio service is unavailable right now.", 60)


def complete_for_player(url: str, job_id: uuid.UUID, token: uuid.UUID, stem: str) -> list[dict[str, Any]]:
    return sql(
        url,
        "select * from complete_job(%s, %s, %s, %s, %s::jsonb, null, %s, %s, %s, %s)",
        job_id,
        token,
        f"http://x/{stem}.wav",
        f"http://x/{stem}.mp3",
        '{"duration_s": 1, "peaks_url": "http://x/p.json"}',
        f"generated/{stem}.wav",
        f"generated/{stem}.mp3",
        f"GEN_{stem}",
        f"prompt of {stem}. 10 seconds",
    )


def completed_job(url: str, user: uuid.UUID, stem: str) -> uuid.UUID:
    job_id = insert_job(url, user_id=user, status="queued", mode="designer")
    token = claim(url, job_id)["lease_token"]  # type: ignore[index]
    assert complete_for_player(url, job_id, token, stem)
    return job_id


def garbage(url: str) -> list[str]:
    return [r["name"] for r in sql(url, "select name from sona_storage_garbage order by name")]


# -- the status a waiting job shows ----------------------------------------------------------------


@pytest.mark.parametrize(("inserted", "waits_as"), [("queued", "queued"), ("pending", "pending")])
def test_a_released_retry_waits_as_the_status_it_was_inserted_with(
    db_url: str, inserted: str, waits_as: str
) -> None:
    job_id = insert_job(db_url, status=inserted)
    token = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
    (row,) = fail(db_url, job_id, token, "The audio service had a temporary problem", retryable=True)
    assert (row["status"], row["error_message"]) == (waits_as, "The audio service had a temporary problem")


@pytest.mark.parametrize(("inserted", "waits_as"), [("queued", "queued"), ("pending", "pending")])
def test_a_job_sent_back_by_a_pause_waits_as_the_status_it_was_inserted_with(
    db_url: str, inserted: str, waits_as: str
) -> None:
    job_id = insert_job(db_url, status=inserted)
    token = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
    (pause,) = sql(db_url, "select * from pause_service(%s, %s, %s, %s, %s, %s)", job_id, token, *OUTAGE)
    assert (pause["released"], pause["released_status"]) == (True, waits_as)
    row = job_row(db_url, job_id)
    assert (row["status"], row["error_message"]) == (waits_as, OUTAGE[2])


def test_an_expired_lease_of_a_plugin_job_goes_back_to_queued(db_url: str) -> None:
    job_id = insert_job(db_url, status="queued", mode="producer")
    claim(db_url, job_id)
    sql(
        db_url,
        "update jobs set lease_expires_at = now() - interval '1 minute' where id = %s",
        job_id,
        role=None,
    )
    reclaimed(db_url, MAX_ATTEMPTS, 60, 100, BASE_MS, CAP_MS)
    assert job_row(db_url, job_id)["status"] == "queued"


# -- the UI's quality names ----------------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "stored"), [("standard", "medium"), ("draft", "low"), ("high", "high")])
def test_the_uis_quality_names_are_stored_as_the_tables(db_url: str, sent: str, stored: str) -> None:
    assert job_row(db_url, insert_job(db_url, quality=sent))["quality"] == stored


# -- results stay the worker's ------------------------------------------------------------------------

PLUGINS_OWN_UPDATE = """create policy "Users can update own jobs" on public.jobs for update
  using (auth.uid() = user_id) with check (auth.uid() = user_id)"""


@pytest.mark.parametrize(
    "change",
    [
        "status = 'completed'",
        "preview_path = 'generated/someone-elses.mp3'",
        "master_path = 'x.wav'",
        "filename = 'Mine.wav'",
        "wav_url = 'https://evil/x.wav'",
        "audio = '{\"duration_s\": 999}'",
        "error_message = null, status = 'queued', attempts = 0",
    ],
)
def test_a_user_cannot_write_a_jobs_status_or_results_even_under_an_own_update_policy(
    private_db_url: str, change: str
) -> None:
    sql(private_db_url, PLUGINS_OWN_UPDATE, role=None)
    sql(private_db_url, "grant update on public.jobs to authenticated", role=None)
    user = new_user(private_db_url)
    job_id = insert_job(private_db_url, user_id=user, status="failed", error_message="moderated")
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="written by the worker"),
        connect(private_db_url, "authenticated", user) as conn,
    ):
        conn.execute(f"update public.jobs set {change} where id = %s", (job_id,))  # type: ignore[arg-type]
    assert job_row(private_db_url, job_id)["status"] == "failed"


def test_a_user_may_still_change_what_the_plugin_lets_them(private_db_url: str) -> None:
    sql(private_db_url, PLUGINS_OWN_UPDATE, role=None)
    sql(private_db_url, "grant update on public.jobs to authenticated", role=None)
    user = new_user(private_db_url)
    job_id = insert_job(private_db_url, user_id=user, status="completed")
    with connect(private_db_url, "authenticated", user) as conn:
        conn.execute("update public.jobs set public = true where id = %s", (job_id,))
    assert job_row(private_db_url, job_id)["public"] is True


@pytest.mark.parametrize(
    "columns",
    [{"status": "completed"}, {"status": "processing"}, {"preview_path": "generated/x.mp3"}, {"attempts": 5}],
)
def test_a_user_cannot_insert_a_job_with_results(db_url: str, columns: dict[str, Any]) -> None:
    sql(db_url, "grant insert on public.jobs to authenticated", role=None)
    user = new_user(db_url)
    names = ", ".join(["user_id", "prompt", *columns])
    marks = ", ".join(["%s"] * (2 + len(columns)))
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="starts pending or queued"),
        connect(db_url, "authenticated", user) as conn,
    ):
        conn.execute(
            f"insert into public.jobs ({names}) values ({marks})",  # type: ignore[arg-type]
            [user, "warm pad", *columns.values()],
        )


# -- cutover from the plug-in's old worker --------------------------------------------------------


def test_the_old_workers_lock_takes_nothing_and_the_claim_still_does(db_url: str) -> None:
    job_id = insert_job(db_url, status="queued", mode="designer")
    # What the plug-in's audio-worker/src/supabase.ts pollNextJob does, as the service role.
    taken = sql(
        db_url,
        "update jobs set status = 'processing', updated_at = now() where id = %s and status = 'queued'"
        " returning id",
        job_id,
    )
    assert taken == []
    assert job_row(db_url, job_id)["status"] == "queued"
    assert claim(db_url, job_id) is not None


def test_a_job_the_old_worker_holds_is_left_to_it_then_failed_never_run_again(db_url: str) -> None:
    job_id = insert_job(db_url, status="processing", mode="creator")  # taken before the cutover
    # the one job there is
    assert reclaim_actions(reclaimed(db_url, MAX_ATTEMPTS, 0, 100, BASE_MS, CAP_MS)) == []
    assert claim(db_url, job_id) is None
    sql(
        db_url,
        "select sona_backfill_jobs(%s)",
        f"update public.jobs set updated_at = now() - interval '2 hours' where id = '{job_id}'",
        role=None,
    )
    assert reclaim_actions(reclaimed(db_url, MAX_ATTEMPTS, 0, 100, BASE_MS, CAP_MS)) == ["failed"]
    assert job_row(db_url, job_id)["status"] == "failed"


# -- what the player reads, and retention ---------------------------------------------------------------


def test_complete_writes_the_paths_file_name_and_prompt_the_player_reads(db_url: str) -> None:
    user = new_user(db_url)
    job_id = completed_job(db_url, user, "a")
    row = job_row(db_url, job_id)
    assert {k: row[k] for k in ("status", "master_path", "preview_path", "filename", "enhanced_prompt")} == {
        "status": "completed",
        "master_path": "generated/a.wav",
        "preview_path": "generated/a.mp3",
        "filename": "GEN_a",
        "enhanced_prompt": "prompt of a. 10 seconds",
    }


def test_each_user_keeps_their_seven_newest_outputs_and_the_rest_are_queued_for_deletion(db_url: str) -> None:
    user, other = new_user(db_url), new_user(db_url)
    jobs = [completed_job(db_url, user, f"u{i}") for i in range(9)]
    completed_job(db_url, other, "o0")
    kept = sql(db_url, "select id from jobs where preview_path is not null and user_id = %s", user)
    assert {r["id"] for r in kept} == set(jobs[2:])
    oldest = job_row(db_url, jobs[0])
    assert (oldest["status"], oldest["master_path"], oldest["mp3_url"], oldest["peaks_url"]) == (
        "completed",
        None,
        None,
        None,
    )
    assert garbage(db_url) == sorted(
        f"generated/u{i}.{ext}" for i in (0, 1) for ext in ("json", "mp3", "wav")
    )


def test_the_plugins_daily_cleanup_lets_our_peaks_file_go_with_its_audio(db_url: str) -> None:
    job_id = completed_job(db_url, new_user(db_url), "c")
    # What cleanup-expired-audio does after deleting the two objects (service role).
    sql(
        db_url,
        "update jobs set master_path = null, preview_path = null, updated_at = now() where id = %s",
        job_id,
    )
    assert garbage(db_url) == ["generated/c.json", "generated/c.mp3", "generated/c.wav"]
    row = job_row(db_url, job_id)
    assert (row["wav_url"], row["mp3_url"], row["result_url"], row["peaks_url"]) == (None, None, None, None)


def test_a_deleted_row_lets_its_files_go(db_url: str) -> None:
    job_id = completed_job(db_url, new_user(db_url), "d")
    sql(db_url, "delete from jobs where id = %s", job_id)
    assert garbage(db_url) == ["generated/d.json", "generated/d.mp3", "generated/d.wav"]


def test_deleted_files_are_forgotten_once_done(db_url: str) -> None:
    completed_job(db_url, new_user(db_url), "e")
    sql(db_url, "update jobs set master_path = null, preview_path = null", role=None)
    assert sql(db_url, "select * from sona_storage_garbage_due(2)") == []  # a day to undo a mistake
    sql(db_url, "update sona_storage_garbage set due_at = now()", role=None)  # the day has passed
    due = sql(db_url, "select * from sona_storage_garbage_due(2)")
    assert len(due) == 2
    assert sql(db_url, "select sona_storage_garbage_done(%s) as n", [d["id"] for d in due]) == [{"n": 2}]
    assert len(garbage(db_url)) == 1


def test_users_cannot_read_or_drive_the_deletions(db_url: str) -> None:
    user = new_user(db_url)
    with pytest.raises(psycopg.errors.InsufficientPrivilege), connect(db_url, "authenticated", user) as conn:
        conn.execute("select * from sona_storage_garbage_due(10)")
