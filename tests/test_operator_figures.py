"""Operator figures in SQL: each attempt's timings and outcome class, written by the fenced call that
ends it, and job_stats() over a known mix of jobs and attempts."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from devstack.emulators.gateway import Gateway
from sona.outcomes import OUTCOME_CLASSES
from sona.rows import Output
from sona.store.jobs import JobsStore
from tests.support import AUDIO_INFO, insert_job, make_settings, reclaimed, sql

LEASE_S, MAX_ATTEMPTS, BASE_MS, CAP_MS = 60, 3, 1000, 60_000


def claim(url: str, job_id: uuid.UUID) -> dict[str, Any]:
    (row,) = sql(url, "select * from claim_job(%s, %s, %s, %s)", job_id, uuid.uuid4(), LEASE_S, MAX_ATTEMPTS)
    return row


def attempt_rows(url: str, job_id: uuid.UUID) -> list[dict[str, Any]]:
    return sql(
        url,
        "select attempt, outcome, outcome_class, timings_ms from job_attempts"
        " where job_id = %s order by attempt",
        job_id,
        role=None,
    )


def fail(
    url: str, job_id: uuid.UUID, token: uuid.UUID, retryable: bool, kind: str, timings: Any
) -> list[Any]:
    return sql(
        url,
        "select * from fail_job(%s, %s, 'nope', %s, %s, %s, %s, %s, %s::jsonb)",
        job_id,
        token,
        retryable,
        MAX_ATTEMPTS,
        BASE_MS,
        CAP_MS,
        kind,
        json.dumps(timings),
    )


def test_complete_keeps_the_attempts_timings_in_the_same_call(db_url: str) -> None:
    job_id = insert_job(db_url)
    token = claim(db_url, job_id)["lease_token"]
    timings = {"claim": 3, "generate": 900, "upload": 40, "total": 1000}
    sql(
        db_url,
        "select * from complete_job(%s, %s, 'w', 'm', '{}'::jsonb, %s::jsonb)",
        job_id,
        token,
        json.dumps(timings),
    )
    assert attempt_rows(db_url, job_id) == [
        {"attempt": 1, "outcome": "completed", "outcome_class": None, "timings_ms": timings}
    ]


@pytest.mark.parametrize(("retryable", "outcome"), [(True, "released"), (False, "failed")])
def test_fail_keeps_the_class_and_timings_of_the_failure(db_url: str, retryable: bool, outcome: str) -> None:
    job_id = insert_job(db_url)
    token = claim(db_url, job_id)["lease_token"]
    fail(db_url, job_id, token, retryable, "storage", {"generate": 800, "total": 950})
    assert attempt_rows(db_url, job_id) == [
        {
            "attempt": 1,
            "outcome": outcome,
            "outcome_class": "storage",
            "timings_ms": {"generate": 800, "total": 950},
        }
    ]


def test_a_stale_failure_writes_no_figures(db_url: str) -> None:
    job_id = insert_job(db_url)
    claim(db_url, job_id)
    assert fail(db_url, job_id, uuid.uuid4(), False, "storage", {"total": 1}) == []
    assert attempt_rows(db_url, job_id)[0]["outcome_class"] is None


def test_an_unknown_class_is_refused(db_url: str) -> None:
    job_id = insert_job(db_url)
    token = claim(db_url, job_id)["lease_token"]
    with pytest.raises(psycopg.errors.CheckViolation):
        fail(db_url, job_id, token, False, "weather", {})


def test_the_schema_accepts_exactly_the_classes_python_writes(db_url: str) -> None:
    (row,) = sql(
        db_url,
        "select pg_get_constraintdef(oid) as def from pg_constraint"
        " where conname = 'job_attempts_outcome_class_check'",
        role=None,
    )
    assert sorted(c for c in OUTCOME_CLASSES if f"'{c}'" in row["def"]) == sorted(OUTCOME_CLASSES)


def test_an_expired_lease_is_classed_as_a_timeout(db_url: str) -> None:
    job_id = insert_job(db_url)
    claim(db_url, job_id)
    sql(db_url, "update jobs set lease_expires_at = now() - interval '1 s' where id = %s", job_id, role=None)
    reclaimed(db_url, MAX_ATTEMPTS, 60, 100, BASE_MS, CAP_MS)
    (row,) = attempt_rows(db_url, job_id)
    assert (row["outcome"], row["outcome_class"]) == ("lease_expired", "timeout")


def test_any_write_that_ends_an_attempt_as_lease_expired_classes_it_as_a_timeout(db_url: str) -> None:
    """The trigger, not only the reclaim (which writes the class itself): its WHEN clause lets it run."""
    job_id = insert_job(db_url)
    claim(db_url, job_id)
    sql(db_url, "update job_attempts set outcome = 'lease_expired' where job_id = %s", job_id, role=None)
    (row,) = attempt_rows(db_url, job_id)
    assert (row["outcome"], row["outcome_class"]) == ("lease_expired", "timeout")


def test_a_reclaimed_attempt_number_starts_without_the_old_figures(db_url: str) -> None:
    job_id = insert_job(db_url)
    token = claim(db_url, job_id)["lease_token"]
    fail(db_url, job_id, token, True, "provider_transient", {"total": 5})
    # The row is put back by hand to before its first claim; claiming again reuses attempt 1's row.
    sql(db_url, "update jobs set attempts = 0, run_after = null where id = %s", job_id, role=None)
    claim(db_url, job_id)
    assert attempt_rows(db_url, job_id) == [
        {"attempt": 1, "outcome": None, "outcome_class": None, "timings_ms": None}
    ]


def test_the_store_sends_the_figures_with_the_final_write(gateway: Gateway, db_url: str) -> None:
    store = JobsStore(
        make_settings(supabase_url=gateway.url, supabase_service_role_key=gateway.service_role_key)
    )
    first, second = insert_job(db_url), insert_job(db_url)
    job = store.claim(first, uuid.uuid4())
    assert job is not None
    store.complete(job, Output("w", "m", AUDIO_INFO), timings_ms={"generate": 7, "total": 9})
    job = store.claim(second, uuid.uuid4())
    assert job is not None
    store.fail(job, message="busy", retryable=True, outcome_class="account", timings_ms={"total": 4})
    assert [(r["outcome_class"], r["timings_ms"]) for r in attempt_rows(db_url, first)] == [
        (None, {"generate": 7, "total": 9})
    ]
    assert [(r["outcome_class"], r["timings_ms"]) for r in attempt_rows(db_url, second)] == [
        ("account", {"total": 4})
    ]


# A known mix, in seconds from a base minute T: (status, [(start, finish, outcome, class, timings)],
# completed). Every job is created at T - 100 s.
MIX: list[tuple[str, list[tuple[int, int, str, str | None, dict[str, int]]], int | None]] = [
    ("completed", [(-98, 10, "completed", None, {"generate": 5000, "upload": 400})], 10),
    ("completed", [(-96, 20, "completed", None, {"generate": 15000, "upload": 600})], 20),
    ("failed", [(-94, -93, "failed", "provider_permanent", {"generate": 1000})], -93),
    (
        "completed",
        [
            (-92, -91, "released", "provider_transient", {"generate": 500}),
            (-20, 30, "completed", None, {"generate": 7000, "upload": 500}),
        ],
        30,
    ),
    (
        "completed",
        [
            (-90, -85, "released", "storage", {"generate": 3000}),
            (-10, 70, "completed", None, {"generate": 9000, "upload": 800}),
        ],
        70,
    ),
    (
        "pending",
        [(-88, -60, "lease_expired", None, {}), (-40, -39, "released", "account", {"generate": 100})],
        None,
    ),
]


@pytest.fixture
def known_mix(db_url: str) -> None:
    (base,) = sql(db_url, "select date_trunc('minute', now()) - interval '5 minutes' as t", role=None)
    t = base["t"]

    def at(seconds: int | None) -> Any:
        return None if seconds is None else t + timedelta(seconds=seconds)

    for status, attempts, completed in MIX:
        job_id = insert_job(
            db_url,
            status=status,
            attempts=len(attempts),
            created_at=at(-100),
            started_at=at(attempts[-1][0]),
            completed_at=at(completed),
        )
        for number, (start, finish, outcome, kind, timings) in enumerate(attempts, 1):
            sql(
                db_url,
                "insert into job_attempts (job_id, attempt, lease_token, started_at, finished_at, outcome,"
                " outcome_class, timings_ms) values (%s, %s, gen_random_uuid(), %s, %s, %s, %s, %s::jsonb)",
                job_id,
                number,
                at(start),
                at(finish),
                outcome,
                kind,
                json.dumps(timings) if timings else None,
                role=None,
            )
    insert_job(
        db_url, status="completed", created_at=t - timedelta(days=2), completed_at=t - timedelta(days=2)
    )


def stats(url: str, hours: int = 1) -> dict[str, Any]:
    (row,) = sql(url, "select job_stats(%s) as s", hours)
    return dict(row["s"])


@pytest.mark.usefixtures("known_mix")
def test_job_stats_counts_jobs_and_their_throughput(db_url: str) -> None:
    figures = stats(db_url)
    assert (figures["total"], figures["by_status"]) == (6, {"completed": 4, "failed": 1, "pending": 1})
    throughput = figures["throughput"]
    assert (throughput["completed"], throughput["per_minute"]) == (4, 0.0667)
    assert throughput["busiest_minute"]["completed"] == 3


@pytest.mark.usefixtures("known_mix")
def test_job_stats_gives_the_failure_rate_of_attempts_by_class(db_url: str) -> None:
    attempts = stats(db_url)["attempts"]
    assert attempts["ended"] == 9
    one_in_nine = {"count": 1, "rate": 0.1111}
    assert attempts["failed_by_class"] == {
        "provider_permanent": one_in_nine,
        "provider_transient": one_in_nine,
        "storage": one_in_nine,
        "timeout": one_in_nine,
        "account": one_in_nine,
    }


@pytest.mark.usefixtures("known_mix")
@pytest.mark.parametrize(
    ("figure", "expected"),
    [
        ("queue_wait_s", {"p50": 7.0, "p95": 11.5}),  # waits 2, 4, ..., 12 s
        ("processing_s", {"p50": 94.0, "p95": 114.8}),  # 50, 80, 108, 116 s
        ("provider", {"calls": 8, "errors": 2, "error_rate": 0.25, "p50_s": 4.0, "p95_s": 12.9}),
        ("storage", {"stored": 4, "failed": 1, "success_rate": 0.8, "upload_p95_s": 0.77}),
        ("retries", {"per_job": 0.5, "max": 1, "jobs_retried": 3}),
    ],
)
def test_job_stats_gives_each_latency_and_rate(db_url: str, figure: str, expected: dict[str, Any]) -> None:
    assert stats(db_url)[figure] == pytest.approx(expected)


def test_job_stats_of_an_empty_window_has_no_figures_rather_than_zeros(db_url: str) -> None:
    figures = stats(db_url)
    assert figures["queue_wait_s"] == {"p50": None, "p95": None}
    assert figures["provider"]["error_rate"] is None
    assert figures["storage"]["success_rate"] is None
    assert figures["throughput"] == {"completed": 0, "per_minute": 0, "busiest_minute": None}


def test_job_stats_reads_the_window_through_indexes(db_url: str) -> None:
    """Served by an index: with many rows outside the window, the scan is an index range."""
    user = sql(db_url, "insert into auth.users default values returning id", role=None)[0]["id"]
    sql(
        db_url,
        "with j as (insert into jobs (user_id, prompt, status, attempts, created_at, completed_at)"
        " select %s, 'old', 'completed', 1, now() - interval '3 days', now() - interval '3 days'"
        " from generate_series(1, 20000) returning id)"
        " insert into job_attempts (job_id, attempt, lease_token, started_at, outcome)"
        " select id, 1, gen_random_uuid(), now() - interval '3 days', 'completed' from j",
        user,
        role=None,
    )
    sql(db_url, "analyze jobs; analyze job_attempts", role=None)
    attempts_seq_scans = "select seq_scan from pg_stat_user_tables where relname = 'job_attempts'"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("select pg_stat_force_next_flush()")
        before = conn.execute(attempts_seq_scans).fetchone()
        conn.execute("select job_stats(24)")
        conn.execute("select pg_stat_force_next_flush()")
        used = dict(
            conn.execute(
                "select indexrelname, idx_scan from pg_stat_user_indexes"
                " where indexrelname in ('jobs_created_idx', 'job_attempts_started_idx')"
            ).fetchall()
        )
        after = conn.execute(attempts_seq_scans).fetchone()
    assert used["jobs_created_idx"] >= 1
    # PostgreSQL 18 reads the attempts by their started_at index; 15 drives the join from the empty
    # window and reads none: either way, never the whole table.
    assert after == before


PERCENTILE_CASES = {
    "one value": [7.0],
    "two values": [1.0, 2.0],
    "duplicates": [1.0, 1.0, 1.0, 2.0, 5.0, 5.0],
    "wide spread": [0.1, 0.25, 3.0, 3.0, 9.5, 120.0, 121.5, 300.0],
}


@pytest.mark.parametrize("values", PERCENTILE_CASES.values(), ids=list(PERCENTILE_CASES))
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.95, 1.0])
def test_a_percentile_of_counted_values_is_percentile_cont_of_the_values(
    db_url: str, values: list[float], fraction: float
) -> None:
    """job_stats() reads its percentiles off counts per millisecond value (sona_percentile)."""
    (row,) = sql(
        db_url,
        "with raw as (select unnest(%s::double precision[]) as v),"
        " counted as (select v, count(*) as n from raw group by v)"
        " select (select percentile_cont(%s) within group (order by v) from raw) as expected,"
        " public.sona_percentile((select array_agg(v order by v) from counted),"
        "                        (select array_agg(n order by v) from counted), %s) as got",
        values,
        fraction,
        fraction,
        role=None,
    )
    assert row["got"] == pytest.approx(row["expected"])
