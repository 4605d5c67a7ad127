"""The job's progress stage in SQL: derived from every status transition, advanced inside an attempt
by advance_stage, fenced by the lease; and the peaks URL copied from the completed row's audio."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from tests.support import connect, insert_job, job_row, sql
from tests.test_state_machine import MAX_ATTEMPTS, claim, complete, expire_lease, fail, reclaim

HISTORY = """
create table public.test_stage_history (seq bigserial primary key, job_id uuid, stage text);
create function public.test_record_stage() returns trigger language plpgsql as $$
begin
  if tg_op = 'INSERT' or old.stage is distinct from new.stage then
    insert into public.test_stage_history (job_id, stage) values (new.id, new.stage);
  end if;
  return null;
end $$;
create trigger test_record_stage after insert or update on public.jobs
  for each row execute function public.test_record_stage();
"""


def advance(url: str, job_id: uuid.UUID, token: Any, stage: str) -> list[dict[str, Any]]:
    return sql(url, "select * from advance_stage(%s, %s, %s)", job_id, token, stage)


def stage_of(url: str, job_id: uuid.UUID) -> str:
    return str(job_row(url, job_id)["stage"])


def history(url: str, job_id: uuid.UUID) -> list[str]:
    rows = sql(url, "select stage from test_stage_history where job_id = %s order by seq", job_id, role=None)
    return [r["stage"] for r in rows]


def test_a_listener_on_the_row_sees_every_stage_of_a_whole_job_in_order(private_db_url: str) -> None:
    url = private_db_url
    sql(url, HISTORY, role=None)
    job_id = insert_job(url)
    row = claim(url, job_id)
    assert row is not None
    for stage in ("generating", "encoding", "uploading"):
        assert advance(url, job_id, row["lease_token"], stage)
    complete(url, job_id, row["lease_token"])
    assert history(url, job_id) == ["queued", "claimed", "generating", "encoding", "uploading", "done"]


@pytest.mark.parametrize(
    ("end", "stage"),
    [("permanent failure", "failed"), ("transient failure", "queued"), ("lease expiry", "queued")],
)
def test_an_attempts_end_sets_the_stage_its_status_implies(db_url: str, end: str, stage: str) -> None:
    job_id = insert_job(db_url)
    row = claim(db_url, job_id)
    assert row is not None
    advance(db_url, job_id, row["lease_token"], "encoding")
    if end == "lease expiry":
        expire_lease(db_url, job_id)
        reclaim(db_url)
    else:
        fail(db_url, job_id, row["lease_token"], "boom", retryable=end == "transient failure")
    assert stage_of(db_url, job_id) == stage


def test_a_lease_that_expires_with_nothing_left_ends_the_job_failed_and_marks_when(db_url: str) -> None:
    """The reclaim writes the stage and updated_at itself (its row triggers skip): what they would."""
    job_id = insert_job(db_url, status="processing", attempts=2 * MAX_ATTEMPTS, lease_token=uuid.uuid4())
    expire_lease(db_url, job_id)
    before = job_row(db_url, job_id)["updated_at"]
    reclaim(db_url)
    row = job_row(db_url, job_id)
    assert (row["status"], row["stage"]) == ("failed", "failed")
    assert row["updated_at"] > before


def test_a_new_attempt_starts_again_at_claimed(db_url: str) -> None:
    job_id = insert_job(db_url)
    first = claim(db_url, job_id)
    assert first is not None
    advance(db_url, job_id, first["lease_token"], "uploading")
    fail(db_url, job_id, first["lease_token"], "busy", retryable=True)
    sql(db_url, "update jobs set run_after = null where id = %s", job_id, role=None)
    assert claim(db_url, job_id) is not None
    assert stage_of(db_url, job_id) == "claimed"


def test_a_stale_workers_stage_write_is_refused_and_changes_nothing(db_url: str) -> None:
    job_id = insert_job(db_url)
    stale = claim(db_url, job_id)
    assert stale is not None
    expire_lease(db_url, job_id)
    reclaim(db_url)
    sql(db_url, "update jobs set run_after = null where id = %s", job_id, role=None)
    current = claim(db_url, job_id)
    assert current is not None
    before = job_row(db_url, job_id)
    assert advance(db_url, job_id, stale["lease_token"], "uploading") == []
    assert job_row(db_url, job_id) == before
    assert advance(db_url, job_id, current["lease_token"], "generating")


def test_a_stage_write_to_a_cancelled_job_says_it_was_cancelled(db_url: str) -> None:
    job_id = insert_job(db_url)
    claimed = claim(db_url, job_id)
    assert claimed is not None
    sql(db_url, "select * from cancel_job(%s)", job_id)
    with pytest.raises(psycopg.Error) as refused:
        advance(db_url, job_id, claimed["lease_token"], "generating")
    assert refused.value.sqlstate == "SQ003"
    assert stage_of(db_url, job_id) == "cancelled"


def test_a_stage_write_after_the_job_ended_is_refused(db_url: str) -> None:
    job_id = insert_job(db_url)
    row = claim(db_url, job_id)
    assert row is not None
    complete(db_url, job_id, row["lease_token"])
    assert advance(db_url, job_id, row["lease_token"], "uploading") == []
    assert stage_of(db_url, job_id) == "done"


def test_a_stage_never_moves_back_but_repeating_it_matches(db_url: str) -> None:
    job_id = insert_job(db_url)
    row = claim(db_url, job_id)
    assert row is not None
    assert advance(db_url, job_id, row["lease_token"], "encoding")
    assert advance(db_url, job_id, row["lease_token"], "encoding")  # a retry after a lost answer
    assert advance(db_url, job_id, row["lease_token"], "generating") == []
    assert stage_of(db_url, job_id) == "encoding"


@pytest.mark.parametrize("stage", ["done", "queued", "claimed", "bogus"])
def test_only_the_stages_inside_an_attempt_can_be_advanced_to(db_url: str, stage: str) -> None:
    job_id = insert_job(db_url)
    row = claim(db_url, job_id)
    assert row is not None
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        advance(db_url, job_id, row["lease_token"], stage)


def test_a_direct_write_cannot_put_the_stage_out_of_step_with_the_status(db_url: str) -> None:
    job_id = insert_job(db_url)
    sql(db_url, "update jobs set stage = 'done' where id = %s", job_id, role=None)
    assert stage_of(db_url, job_id) == "queued"


def test_a_user_cannot_move_a_stage(db_url: str) -> None:
    job_id = insert_job(db_url)
    row = claim(db_url, job_id)
    assert row is not None
    with pytest.raises(psycopg.errors.InsufficientPrivilege), connect(db_url, "authenticated") as conn:
        conn.execute("select * from advance_stage(%s, %s, 'uploading')", (job_id, row["lease_token"]))


def test_the_completed_rows_peaks_url_comes_from_its_audio_info(db_url: str) -> None:
    job_id = insert_job(db_url)
    row = claim(db_url, job_id)
    assert row is not None
    (done,) = sql(
        db_url,
        "select * from complete_job(%s, %s, 'http://x/a.wav', 'http://x/a.mp3', %s::jsonb)",
        job_id,
        row["lease_token"],
        '{"duration_s": 1, "peaks_url": "http://x/a.json"}',
    )
    assert (done["stage"], done["peaks_url"]) == ("done", "http://x/a.json")
