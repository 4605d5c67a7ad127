"""The state machine in SQL: claim exactly once, fenced terminal writes, backoff, reclaim."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from tests.support import connect, dispatched, insert_job, job_row, reclaim_actions, reclaimed, sql

LEASE_S, MAX_ATTEMPTS, BASE_MS, CAP_MS = 60, 3, 1000, 60_000


def claim(url: str, job_id: uuid.UUID, claim_id: uuid.UUID | None = None) -> dict[str, Any] | None:
    claim_id = claim_id or uuid.uuid4()
    rows = sql(url, "select * from claim_job(%s, %s, %s, %s)", job_id, claim_id, LEASE_S, MAX_ATTEMPTS)
    return rows[0] if rows else None


def complete(url: str, job_id: uuid.UUID, token: uuid.UUID, suffix: str = "a") -> list[dict[str, Any]]:
    return sql(
        url,
        "select * from complete_job(%s, %s, %s, %s, %s::jsonb)",
        job_id,
        token,
        f"http://x/{suffix}.wav",
        f"http://x/{suffix}.mp3",
        '{"duration_s": 1}',
    )


def fail(
    url: str, job_id: uuid.UUID, token: uuid.UUID, message: str, retryable: bool
) -> list[dict[str, Any]]:
    return sql(
        url,
        "select * from fail_job(%s, %s, %s, %s, %s, %s, %s)",
        job_id,
        token,
        message,
        retryable,
        MAX_ATTEMPTS,
        BASE_MS,
        CAP_MS,
    )


def reclaim(url: str, grace_s: int = 60, limit: int = 100) -> dict[str, Any]:
    """What reclaim did: how many it released and failed, and the jobs it dispatched."""
    return reclaimed(url, MAX_ATTEMPTS, grace_s, limit, BASE_MS, CAP_MS)


def test_each_dispatch_names_its_attempt_and_a_new_round(db_url: str) -> None:
    """Cloud Tasks keeps an executed task's name reserved: every dispatch of a job needs a new one."""
    insert_job(db_url)
    sql(db_url, "update jobs set created_at = now() - interval '1 hour'", role=None)
    rounds = []
    for _ in range(2):
        (row,) = reclaim(db_url, grace_s=0)["dispatch"]
        rounds.append((row["attempt"], row["dispatch_round"]))
    assert rounds == [(0, 1), (0, 2)]


def expire_lease(url: str, job_id: uuid.UUID) -> None:
    sql(
        url, "update jobs set lease_expires_at = now() - interval '1 second' where id = %s", job_id, role=None
    )


def make_due(url: str, job_id: uuid.UUID) -> None:
    sql(url, "update jobs set run_after = now() - interval '1 second' where id = %s", job_id, role=None)


# -- claim ---------------------------------------------------------------------------------------


def test_claim_takes_a_pending_job_counts_the_attempt_and_stamps_a_lease(db_url: str) -> None:
    job_id = insert_job(db_url)
    row = claim(db_url, job_id)
    assert row is not None
    assert (row["status"], row["attempts"]) == ("processing", 1)
    assert row["lease_token"] is not None
    seconds = sql(
        db_url, "select extract(epoch from lease_expires_at - now()) as s from jobs where id = %s", job_id
    )[0]["s"]
    assert LEASE_S - 5 < seconds <= LEASE_S


@pytest.mark.parametrize("status", ["processing", "completed", "failed"])
def test_claim_finds_nothing_in_a_non_claimable_status(db_url: str, status: str) -> None:
    job_id = insert_job(db_url, status=status)
    assert claim(db_url, job_id) is None
    assert job_row(db_url, job_id)["attempts"] == 0


def test_claim_of_an_unknown_id_finds_nothing(db_url: str) -> None:
    assert claim(db_url, uuid.uuid4()) is None


def test_claim_waits_for_run_after(db_url: str) -> None:
    job_id = insert_job(db_url)
    sql(db_url, "update jobs set run_after = now() + interval '1 hour' where id = %s", job_id, role=None)
    assert claim(db_url, job_id) is None


def test_claim_respects_max_attempts(db_url: str) -> None:
    job_id = insert_job(db_url, attempts=MAX_ATTEMPTS)
    assert claim(db_url, job_id) is None


def test_a_claim_repeated_with_its_claim_id_gets_the_same_lease_without_a_new_attempt(db_url: str) -> None:
    job_id, claim_id = insert_job(db_url), uuid.uuid4()
    first = claim(db_url, job_id, claim_id)
    again = claim(db_url, job_id, claim_id)
    assert first is not None and again is not None
    assert again == first
    assert (again["lease_token"], again["attempts"]) == (claim_id, 1)
    assert sql(db_url, "select attempt from job_attempts where job_id = %s", job_id) == [{"attempt": 1}]


def test_a_claim_id_gets_nothing_once_its_lease_has_ended(db_url: str) -> None:
    job_id, claim_id = insert_job(db_url), uuid.uuid4()
    claim(db_url, job_id, claim_id)
    complete(db_url, job_id, claim_id)
    assert claim(db_url, job_id, claim_id) is None
    assert job_row(db_url, job_id)["attempts"] == 1


def test_a_claim_that_waited_for_its_own_first_try_to_commit_gets_that_lease(db_url: str) -> None:
    job_id, claim_id = insert_job(db_url), uuid.uuid4()
    answers: list[list[dict[str, Any]]] = []
    with connect(db_url, "service_role") as first:
        first.execute("select * from claim_job(%s, %s, 60, 3)", (job_id, claim_id))
        # The retry arrives while the first try still holds the row: it waits, then must not miss it.
        retry = threading.Thread(
            target=lambda: answers.append(
                sql(db_url, "select * from claim_job(%s, %s, 60, 3)", job_id, claim_id)
            )
        )
        retry.start()
        retry.join(timeout=0.5)
        assert retry.is_alive()
    retry.join()
    assert [(r["lease_token"], r["attempts"]) for r in answers[0]] == [(claim_id, 1)]


def test_a_claim_after_the_paid_attempts_is_a_reuse_only_finishing_attempt(db_url: str) -> None:
    job_id = insert_job(db_url, status="processing", attempts=MAX_ATTEMPTS, lease_token=uuid.uuid4())
    expire_lease(db_url, job_id)
    reclaim(db_url)
    make_due(db_url, job_id)
    row = claim(db_url, job_id)
    assert row is not None
    assert (row["attempts"], row["reuse_only"]) == (MAX_ATTEMPTS + 1, True)


def test_a_claim_with_paid_attempts_left_is_not_reuse_only(db_url: str) -> None:
    row = claim(db_url, insert_job(db_url, attempts=MAX_ATTEMPTS - 1, reuse_only=True))
    assert row is not None
    assert (row["attempts"], row["reuse_only"]) == (MAX_ATTEMPTS, False)


# (attempts before the claim, reuse_only, claimable)
FINISHING_BUDGET = [
    (MAX_ATTEMPTS, False, False),
    (MAX_ATTEMPTS, True, True),
    (2 * MAX_ATTEMPTS - 1, True, True),
    (2 * MAX_ATTEMPTS, True, False),
]


@pytest.mark.parametrize(("attempts", "reuse_only", "claimable"), FINISHING_BUDGET)
def test_finishing_attempts_are_bounded_by_max_attempts_more(
    db_url: str, attempts: int, reuse_only: bool, claimable: bool
) -> None:
    job_id = insert_job(db_url, attempts=attempts, reuse_only=reuse_only)
    assert (claim(db_url, job_id) is not None) is claimable


# (attempts before the claim, reuse_only, status after a transient failure)
FINISHING_FAILURES = [
    (MAX_ATTEMPTS, True, "pending"),
    (2 * MAX_ATTEMPTS - 1, True, "failed"),
]


@pytest.mark.parametrize(("attempts", "reuse_only", "status"), FINISHING_FAILURES)
def test_a_finishing_attempts_transient_failure_releases_it_while_finishing_attempts_remain(
    db_url: str, attempts: int, reuse_only: bool, status: str
) -> None:
    job_id = insert_job(db_url, attempts=attempts, reuse_only=reuse_only)
    token = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
    assert fail(db_url, job_id, token, "Storage is away", retryable=True)[0]["status"] == status


def test_fifty_simultaneous_claims_give_the_job_to_exactly_one(db_url: str) -> None:
    job_id = insert_job(db_url)
    connections = [psycopg.connect(db_url, autocommit=True) for _ in range(50)]
    barrier = threading.Barrier(50)
    results: list[int] = []
    lock = threading.Lock()

    def race(conn: psycopg.Connection[Any]) -> None:
        conn.execute("set role service_role")
        barrier.wait()
        rows = conn.execute("select id from claim_job(%s, gen_random_uuid(), 60, 3)", (job_id,)).fetchall()
        with lock:
            results.append(len(rows))

    threads = [threading.Thread(target=race, args=(c,)) for c in connections]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in connections:
        c.close()
    assert sorted(results) == [0] * 49 + [1]
    assert job_row(db_url, job_id)["attempts"] == 1


# -- complete and fail, fenced ------------------------------------------------------------------


def test_complete_writes_the_urls_and_ends_the_lease(db_url: str) -> None:
    job_id = insert_job(db_url)
    token = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
    assert len(complete(db_url, job_id, token)) == 1
    row = job_row(db_url, job_id)
    assert row["status"] == "completed"
    assert row["result_url"] == row["mp3_url"] == "http://x/a.mp3"
    assert row["completed_at"] is not None
    assert row["lease_token"] is None
    history = sql(db_url, "select outcome from job_attempts where job_id = %s", job_id)
    assert history == [{"outcome": "completed"}]


def test_permanent_failure_fails_the_job_with_its_message(db_url: str) -> None:
    job_id = insert_job(db_url)
    token = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
    fail(db_url, job_id, token, "The prompt was flagged", retryable=False)
    row = job_row(db_url, job_id)
    assert (row["status"], row["error_message"]) == ("failed", "The prompt was flagged")


def test_transient_failure_releases_the_job_with_backoff_in_sql(db_url: str) -> None:
    job_id = insert_job(db_url)
    token = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
    fail(db_url, job_id, token, "busy", retryable=True)
    row = sql(
        db_url, "select status, extract(epoch from run_after - now()) as wait from jobs where id = %s", job_id
    )[0]
    assert row["status"] == "pending"
    assert BASE_MS / 2000 - 0.2 <= float(row["wait"]) <= BASE_MS / 1000  # equal jitter, attempt 1


def test_transient_failure_on_the_last_attempt_fails_and_says_it_gave_up(db_url: str) -> None:
    job_id = insert_job(db_url, attempts=MAX_ATTEMPTS - 1)
    token = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
    fail(db_url, job_id, token, "The audio service is busy", retryable=True)
    row = job_row(db_url, job_id)
    assert row["status"] == "failed"
    assert row["error_message"] == "The audio service is busy (gave up after 3 attempts)"


def test_backoff_grows_and_is_capped(db_url: str) -> None:
    waits = {
        a: sql(db_url, "select extract(epoch from sona_backoff(%s, 1000, 5000)) as s", a)[0]["s"]
        for a in (1, 2, 3, 10)
    }
    assert 0.5 <= waits[1] <= 1
    assert 1 <= waits[2] <= 2
    assert 2 <= waits[3] <= 4
    assert 2.5 <= waits[10] <= 5


def test_every_attempt_keeps_its_own_error(db_url: str) -> None:
    job_id = insert_job(db_url)
    for message in ("first", "second"):
        token = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
        fail(db_url, job_id, token, message, retryable=True)
        make_due(db_url, job_id)
    history = sql(
        db_url, "select attempt, outcome, error from job_attempts where job_id = %s order by attempt", job_id
    )
    assert history == [
        {"attempt": 1, "outcome": "released", "error": "first"},
        {"attempt": 2, "outcome": "released", "error": "second"},
    ]


def test_a_worker_whose_lease_was_reclaimed_cannot_write(db_url: str) -> None:
    job_id = insert_job(db_url)
    stale = claim(db_url, job_id)["lease_token"]  # type: ignore[index]
    expire_lease(db_url, job_id)
    assert reclaim(db_url)["released"] == 1  # the one job there is
    make_due(db_url, job_id)
    fresh = claim(db_url, job_id)["lease_token"]  # type: ignore[index]

    assert complete(db_url, job_id, stale, "stale") == []
    assert fail(db_url, job_id, stale, "stale", retryable=False) == []
    row = job_row(db_url, job_id)
    assert (row["status"], row["lease_token"], row["wav_url"]) == ("processing", fresh, None)
    assert len(complete(db_url, job_id, fresh, "fresh")) == 1
    assert job_row(db_url, job_id)["wav_url"] == "http://x/fresh.wav"


# -- reclaim -------------------------------------------------------------------------------------

# (name, columns, backdate SQL, actions reclaim takes, status after, error_message after)
RECLAIM_CASES: list[tuple[str, dict[str, Any], str, list[str], str, str | None]] = [
    (
        "expired lease, attempts left",
        {"status": "processing", "attempts": 1},
        "lease_expires_at = now() - interval '2 seconds'",
        ["released", "dispatch"],
        "pending",
        "The attempt timed out; retrying.",
    ),
    (
        "lease expired inside its backoff",
        {"status": "processing", "attempts": 1},
        "lease_expires_at = now() - interval '10 milliseconds'",
        ["released"],
        "pending",
        "The attempt timed out; retrying.",
    ),
    (
        "expired lease, last paid attempt: released to finish from its stored files",
        {"status": "processing", "attempts": 3},
        "lease_expires_at = now() - interval '1 second'",
        ["released"],
        "pending",
        "The attempt timed out; looking for the audio it stored.",
    ),
    (
        "expired lease, finishing attempts spent",
        {"status": "processing", "attempts": 6, "reuse_only": True},
        "lease_expires_at = now() - interval '1 second'",
        ["failed"],
        "failed",
        "The job timed out after 6 attempts.",
    ),
    (
        "finishing attempt due",
        {"attempts": 3, "reuse_only": True},
        "run_after = now() - interval '1 second'",
        ["dispatch"],
        "pending",
        None,
    ),
    (
        "processing with no lease (the plug-in's old worker), inside its hour",
        {"status": "processing", "attempts": 0},
        "created_at = now() - interval '1 hour', updated_at = now() - interval '59 minutes'",
        [],
        "processing",
        None,
    ),
    (
        "processing with no lease (the plug-in's old worker), past its hour: failed, never run again",
        {"status": "processing", "attempts": 0},
        "created_at = now() - interval '2 hours', updated_at = now() - interval '61 minutes'",
        ["failed"],
        "failed",
        "The job did not finish; please try again.",
    ),
    (
        "live lease",
        {"status": "processing", "attempts": 1},
        "lease_expires_at = now() + interval '5 seconds'",
        [],
        "processing",
        None,
    ),
    (
        "pending past the grace period",
        {"attempts": 0},
        "created_at = now() - interval '61 seconds'",
        ["dispatch"],
        "pending",
        None,
    ),
    (
        "pending inside the grace period",
        {"attempts": 0},
        "created_at = now() - interval '59 seconds'",
        [],
        "pending",
        None,
    ),
    (
        "queued past the grace period",
        {"status": "queued"},
        "created_at = now() - interval '2 minutes'",
        ["dispatch"],
        "queued",
        None,
    ),
    (
        "released retry past run_after",
        {"attempts": 1},
        "run_after = now() - interval '1 second'",
        ["dispatch"],
        "pending",
        None,
    ),
    (
        "released retry before run_after",
        {"attempts": 1},
        "run_after = now() + interval '5 seconds'",
        [],
        "pending",
        None,
    ),
    (
        "pending with no attempts left",
        {"attempts": 3},
        "created_at = now() - interval '2 minutes'",
        ["failed"],
        "failed",
        None,
    ),
    (
        "dispatched moments ago",
        {"attempts": 0},
        "created_at = now() - interval '2 minutes', dispatched_at = now() - interval '5 seconds'",
        [],
        "pending",
        None,
    ),
    (
        "completed long ago",
        {"status": "completed"},
        "created_at = now() - interval '1 day'",
        [],
        "completed",
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "columns", "backdate", "actions", "status", "error"),
    RECLAIM_CASES,
    ids=[c[0] for c in RECLAIM_CASES],
)
def test_reclaim_case(
    db_url: str,
    name: str,
    columns: dict[str, Any],
    backdate: str,
    actions: list[str],
    status: str,
    error: str | None,
) -> None:
    job_id = insert_job(db_url, **columns)
    if columns.get("status") == "processing" and columns.get("attempts"):
        sql(db_url, "update jobs set lease_token = gen_random_uuid() where id = %s", job_id, role=None)
    # Backdated with the updated_at triggers held off, so a backdated updated_at stays.
    backdating = f"update public.jobs set {backdate} where id = '{job_id}'"
    sql(db_url, "select sona_backfill_jobs(%s)", backdating, role=None)

    done = reclaim(db_url)

    assert reclaim_actions(done) == actions  # the one job there is
    assert dispatched(done) == ([job_id] if "dispatch" in actions else [])
    row = job_row(db_url, job_id)
    assert row["status"] == status
    if error:
        assert row["error_message"] == error


def test_reclaim_dispatches_a_job_once_per_grace_period(db_url: str) -> None:
    job_id = insert_job(db_url)
    sql(db_url, "update jobs set created_at = now() - interval '2 minutes' where id = %s", job_id, role=None)
    first = reclaim(db_url)
    assert (reclaim_actions(first), dispatched(first)) == (["dispatch"], [job_id])
    assert reclaim_actions(reclaim(db_url)) == []


def test_two_reclaims_at_once_do_not_both_act(db_url: str) -> None:
    job_id = insert_job(db_url, status="processing", attempts=1)
    sql(
        db_url,
        "update jobs set lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 second'"
        " where id = %s",
        job_id,
        role=None,
    )
    with connect(db_url, "service_role") as first:
        acted = first.execute("select reclaim_and_dispatch(3, 60, 100, 1000, 60000) as done").fetchone()
        # The first call's transaction is still open: a second call at this moment does nothing.
        assert reclaim_actions(reclaim(db_url)) == []
    assert acted is not None
    assert reclaim_actions(acted["done"]) == ["released", "dispatch"]
    assert job_row(db_url, job_id)["status"] == "pending"


def _expired_lease(db_url: str) -> uuid.UUID:
    job_id = insert_job(db_url, status="processing", attempts=1)
    sql(
        db_url,
        "update jobs set lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 minute'"
        " where id = %s",
        job_id,
        role=None,
    )
    return job_id


@pytest.mark.parametrize(("grace_s", "writes"), [(60, 1), (0, 2)])
def test_a_released_job_due_at_once_is_dispatched_once_by_the_write_that_releases_it(
    db_url: str, grace_s: int, writes: int
) -> None:
    """Released and stamped for dispatch in one write when everything due fits the batch and a
    grace period keeps it from being picked again; with no grace period, released and then
    dispatched by a second write. Either way one 'released', one 'dispatch', one round on the row."""
    job_id = _expired_lease(db_url)
    with connect(db_url, "service_role") as conn:
        acted = conn.execute(
            "select reclaim_and_dispatch(%s, %s, %s, %s, %s) as done", (MAX_ATTEMPTS, grace_s, 100, 1, 1)
        ).fetchone()
        updates = conn.execute("select n_tup_upd as n from pg_stat_xact_user_tables where relname = 'jobs'")
        written = updates.fetchone()
    assert acted is not None
    assert (reclaim_actions(acted["done"]), dispatched(acted["done"])) == (["released", "dispatch"], [job_id])
    assert job_row(db_url, job_id)["dispatches"] == 1
    assert written == {"n": writes}


def test_reclaim_limits_the_batch_it_dispatches(db_url: str) -> None:
    for _ in range(5):
        job_id = insert_job(db_url)
        sql(
            db_url,
            "update jobs set created_at = now() - interval '2 minutes' where id = %s",
            job_id,
            role=None,
        )
    assert reclaim_actions(reclaim(db_url, limit=3)) == ["dispatch"] * 3
    assert reclaim_actions(reclaim(db_url, limit=3)) == ["dispatch"] * 2
