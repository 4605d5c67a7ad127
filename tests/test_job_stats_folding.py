"""job_stats() over folded hours: each settled hour is counted once (sona_fold_job_stats), and the
answer is the one the rows themselves give (supabase/schemas/40_stats.sql)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from devstack.emulators.gateway import Gateway
from sona.store.jobs import JobsStore
from tests.support import connect, insert_job, make_settings, sql

# 600 jobs over the last 30 hours, every kind job_stats() counts: completed and failed, retried
# (their first attempt's wait comes from job_attempts), spread processing, provider and upload times.
HISTORY = """
with j as (
  insert into jobs (user_id, prompt, duration, status, attempts, created_at, started_at, completed_at)
  select %(user)s, 'history', 10,
         case when i %% 7 = 0 then 'failed' else 'completed' end,
         case when i %% 5 = 0 then 2 else 1 end,
         t, t + make_interval(secs => 1 + i %% 13), t + make_interval(secs => 20 + (i * 37) %% 90)
    from generate_series(1, 600) i,
         lateral (select now() - make_interval(secs => i * 180 - 30)) c(t)
  returning id, attempts, created_at, started_at, status
)
insert into job_attempts (job_id, attempt, lease_token, started_at, finished_at, outcome, outcome_class,
                          timings_ms)
select j.id, n, gen_random_uuid(), j.created_at + make_interval(secs => n),
       j.created_at + interval '1 minute',
       case when n < j.attempts then 'released' when j.status = 'failed' then 'failed' else 'completed' end,
       case when n < j.attempts then 'provider_transient' when j.status = 'failed' then 'storage' end,
       jsonb_build_object('generate', 9000 + (random() * 30000)::int, 'upload', 100 + (random() * 900)::int)
  from j, generate_series(1, j.attempts) n
"""


@pytest.fixture
def history(db_url: str) -> str:
    user = sql(db_url, "insert into auth.users default values returning id", role=None)[0]["id"]
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute(HISTORY, {"user": user})
    return db_url


@pytest.fixture
def conn(history: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """One transaction: now() stands still, so the same window is read before and after a fold."""
    with psycopg.connect(history, row_factory=dict_row) as connection:
        yield connection
        connection.rollback()


def job_stats(conn: psycopg.Connection[dict[str, Any]], hours: int) -> dict[str, Any]:
    row = conn.execute("select job_stats(%s) as s", (hours,)).fetchone()
    assert row is not None
    return dict(row["s"])


def fold(conn: psycopg.Connection[dict[str, Any]], limit: int = 1000) -> int:
    row = conn.execute("select sona_fold_job_stats(%s) as n", (limit,)).fetchone()
    assert row is not None
    return int(row["n"])


def folded_hours(conn: psycopg.Connection[dict[str, Any]]) -> int:
    row = conn.execute(
        "select count(*) as n from sona_stats_hours where hour > now() - interval '2 days'"
    ).fetchone()
    assert row is not None
    return int(row["n"])


@pytest.mark.parametrize("hours", [1, 6, 24, 48])
def test_folding_the_settled_hours_leaves_job_stats_as_it_was(
    conn: psycopg.Connection[dict[str, Any]], hours: int
) -> None:
    before = job_stats(conn, hours)
    assert fold(conn) > 0
    assert job_stats(conn, hours) == before
    assert before["total"] > 0


def test_an_hour_is_folded_once(conn: psycopg.Connection[dict[str, Any]]) -> None:
    assert fold(conn) > 0
    assert fold(conn) == 0


def test_the_newest_settled_hours_are_folded_first(conn: psycopg.Connection[dict[str, Any]]) -> None:
    assert fold(conn, limit=3) == 3
    row = conn.execute(
        "select min(hour) > now() - interval '5 hours' as recent from sona_stats_hours"
    ).fetchone()
    assert row is not None and row["recent"]


# What keeps an hour from settling: (a job of that hour, its attempt's outcome)
UNSETTLED = [("pending", None), ("processing", None), ("completed", None)]


@pytest.mark.parametrize(
    ("status", "outcome"), UNSETTLED, ids=["a pending job", "a running job", "an open attempt"]
)
def test_an_hour_with_work_still_going_on_is_not_folded(
    conn: psycopg.Connection[dict[str, Any]], status: str, outcome: str | None
) -> None:
    created = conn.execute(
        "select date_trunc('hour', now()) - interval '3 hours' + interval '10 minutes' as t"
    ).fetchone()
    assert created is not None
    job = conn.execute(
        "insert into jobs (user_id, prompt, status, attempts, created_at) select user_id, 'late', %s, 1, %s"
        " from jobs limit 1 returning id",
        (status, created["t"]),
    ).fetchone()
    assert job is not None
    conn.execute(
        "insert into job_attempts (job_id, attempt, lease_token, started_at, outcome)"
        " values (%s, 1, %s, %s, %s)",
        (job["id"], uuid.uuid4(), created["t"], outcome),
    )
    fold(conn)
    row = conn.execute(
        "select count(*) as n from sona_stats_hours where hour = date_trunc('hour', %s::timestamptz, 'UTC')",
        (created["t"],),
    ).fetchone()
    assert row is not None and row["n"] == 0


def counted_from_the_rows(conn: psycopg.Connection[dict[str, Any]], hours: int) -> dict[str, Any]:
    """job_stats() with nothing folded (undone at once: the caller's folds stay)."""
    conn.execute("savepoint unfolded")
    conn.execute("delete from sona_stats_hours")
    figures = job_stats(conn, hours)
    conn.execute("rollback to savepoint unfolded")
    return figures


A_JOB_3_HOURS_OLD = (
    "(select id from jobs where created_at < now() - interval '3 hours' order by created_at desc limit 1)"
)

# Changes to the rows of a folded hour: each unfolds it, so the answer stays the rows' own.
CHANGES = {
    "a deleted job": f"delete from jobs where id = {A_JOB_3_HOURS_OLD}",
    "a deleted attempt": f"delete from job_attempts where job_id = {A_JOB_3_HOURS_OLD}",
    # a pause's release reopens the attempt, and the next claim restarts it now
    "an ended attempt started again": "update job_attempts set started_at = now(), outcome = null"
    f" where job_id = {A_JOB_3_HOURS_OLD} and attempt = 1",
    "a finished job changed": f"update jobs set status = 'failed' where id = {A_JOB_3_HOURS_OLD}",
    "a job inserted with an old time": "insert into jobs (user_id, prompt, status, attempts, created_at)"
    " select user_id, 'backfilled', 'completed', 1, now() - interval '3 hours 30 minutes' from jobs limit 1",
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=list(CHANGES))
def test_a_change_to_a_folded_hour_unfolds_it_and_the_answer_stays_the_rows_own(
    conn: psycopg.Connection[dict[str, Any]], change: str
) -> None:
    fold(conn)
    folded = folded_hours(conn)
    conn.execute(change)
    assert folded_hours(conn) < folded
    assert job_stats(conn, 24) == counted_from_the_rows(conn, 24)
    fold(conn)
    assert job_stats(conn, 24) == counted_from_the_rows(conn, 24)


def without_times(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures whose JSON does not depend on the session's time zone (timestamps do)."""
    busiest = figures["throughput"].pop("busiest_minute")
    figures.pop("recent_failures")
    return {**figures, "busiest_completed": busiest["completed"]}


def test_hours_are_utc_hours_in_any_session_time_zone(conn: psycopg.Connection[dict[str, Any]]) -> None:
    fold(conn)
    in_utc = job_stats(conn, 24)
    conn.execute("set time zone 'Asia/Kolkata'")  # UTC+5:30: its own hours start at :30
    assert without_times(job_stats(conn, 24)) == without_times(in_utc)
    folded = folded_hours(conn)
    conn.execute(f"delete from jobs where id = {A_JOB_3_HOURS_OLD}")
    assert folded_hours(conn) < folded
    assert job_stats(conn, 24) == counted_from_the_rows(conn, 24)


# A time in ms at four significant digits: exact below 10 s.
ROUNDED = [(0, 0), (523, 523), (9999, 9999), (12346, 12350), (25344, 25340), (123456, 123500), (None, None)]


@pytest.mark.parametrize(("ms", "expected"), ROUNDED)
def test_a_time_is_counted_at_four_significant_digits(
    db_url: str, ms: float | None, expected: float | None
) -> None:
    (row,) = sql(db_url, "select sona_stats_round(%s::double precision) as r", ms, role=None)
    assert row["r"] == expected


def test_the_store_folds_the_settled_hours_over_rpc(history: str, gateway: Gateway) -> None:
    store = JobsStore(
        make_settings(supabase_url=gateway.url, supabase_service_role_key=gateway.service_role_key)
    )
    assert store.fold_stats(max_hours=5) == 5


@pytest.mark.parametrize(
    "query",
    ["select sona_fold_job_stats(1)", "select * from sona_stats_job_groups", "delete from sona_stats_hours"],
)
def test_a_signed_in_user_cannot_fold_read_or_drop_the_folds(history: str, query: str) -> None:
    (owner,) = sql(history, "select user_id from jobs where id = %s", insert_job(history), role=None)
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege),
        connect(history, "authenticated", owner["user_id"]) as c,
    ):
        c.execute(query)
