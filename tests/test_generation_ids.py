"""The generation id on the row (supabase/schemas/30_state_machine.sql): written and forgotten only by
the attempt holding the lease, kept across attempts, counted when forgotten, never written by a user."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from tests.support import connect, insert_job, job_row, new_user, sql

ID_A, ID_B = "a" * 64, "b" * 64


def claimed(db_url: str) -> tuple[uuid.UUID, uuid.UUID]:
    job, lease = insert_job(db_url), uuid.uuid4()
    assert sql(db_url, "select id from claim_job(%s, %s, 60, 3)", job, lease)
    return job, lease


def record(db_url: str, job: uuid.UUID, lease: uuid.UUID, generation_id: str) -> list[dict[str, Any]]:
    return sql(
        db_url,
        "select generation_id, generation_model from record_generation(%s, %s, %s, 'stable-audio-3')",
        job,
        lease,
        generation_id,
    )


def test_the_lease_holder_writes_the_id_and_a_repeat_of_it_is_a_no_op(db_url: str) -> None:
    job, lease = claimed(db_url)
    assert record(db_url, job, lease, ID_A) == [{"generation_id": ID_A, "generation_model": "stable-audio-3"}]
    posted = job_row(db_url, job)["generation_posted_at"]
    assert record(db_url, job, lease, ID_A) == [{"generation_id": ID_A, "generation_model": "stable-audio-3"}]
    assert job_row(db_url, job)["generation_posted_at"] == posted


@pytest.mark.parametrize("who", ["a stale lease", "a second id over the first"])
def test_a_write_without_the_lease_or_over_another_id_matches_nothing(db_url: str, who: str) -> None:
    job, lease = claimed(db_url)
    record(db_url, job, lease, ID_A)
    if who == "a stale lease":
        assert record(db_url, job, uuid.uuid4(), ID_B) == []
    else:
        assert record(db_url, job, lease, ID_B) == []
    assert job_row(db_url, job)["generation_id"] == ID_A


def test_the_id_outlives_the_attempt_and_the_next_claim_sees_it(db_url: str) -> None:
    job, lease = claimed(db_url)
    record(db_url, job, lease, ID_A)
    sql(db_url, "select * from fail_job(%s, %s, 'timed out', true, 3, 0, 0)", job, lease)
    sql(db_url, "update jobs set run_after = null where id = %s", job, role=None)
    rows = sql(db_url, "select generation_id, attempts from claim_job(%s, %s, 60, 3)", job, uuid.uuid4())
    assert rows == [{"generation_id": ID_A, "attempts": 2}]


def test_forgetting_an_expired_id_clears_it_and_counts_it_once(db_url: str) -> None:
    job, lease = claimed(db_url)
    record(db_url, job, lease, ID_A)
    forget = "select generations_lost from forget_generation(%s, %s, %s)"
    assert sql(db_url, forget, job, lease, ID_B) == []  # not the id on the row
    assert sql(db_url, forget, job, lease, ID_A) == [{"generations_lost": 1}]
    assert sql(db_url, forget, job, lease, ID_A) == []  # already forgotten: counted once
    row = job_row(db_url, job)
    assert (row["generation_id"], row["generation_model"], row["generations_lost"]) == (None, None, 1)


@pytest.mark.parametrize(
    "query",
    [
        "select * from record_generation(%(job)s, gen_random_uuid(), 'x', 'stable-audio-3')",
        "select * from forget_generation(%(job)s, gen_random_uuid(), 'x')",
        "select generation_stats(24)",
    ],
    ids=["record", "forget", "stats"],
)
def test_a_user_cannot_call_the_generation_functions(db_url: str, query: str) -> None:
    me = new_user(db_url)
    job = insert_job(db_url, user_id=me)
    with pytest.raises(psycopg.Error) as caught, connect(db_url, "authenticated", me) as conn:
        conn.execute(query, {"job": job})
    assert caught.value.sqlstate == "42501"


def test_a_signed_in_insert_naming_a_generation_is_refused(private_db_url: str) -> None:
    """The plug-in's own-update policy lets an owner write their row; the guard keeps the worker's
    generation columns out of reach either way (here: the insert, which users may make; granted the
    column in a database of its own)."""
    me = new_user(private_db_url)
    sql(private_db_url, "grant insert (generation_id) on public.jobs to authenticated", role=None)
    try:
        with pytest.raises(psycopg.Error) as caught, connect(private_db_url, "authenticated", me) as conn:
            conn.execute("insert into jobs (user_id, prompt, generation_id) values (%s, 'x', %s)", (me, ID_A))
        assert (caught.value.sqlstate, caught.value.diag.message_hint) == ("42501", "sona_results_protected")
    finally:
        sql(private_db_url, "revoke insert (generation_id) on public.jobs from authenticated", role=None)
