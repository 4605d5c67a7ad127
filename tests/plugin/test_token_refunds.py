"""Issue 20: a job that gives the musician nothing gives their tokens back, once; on the plug-in's
schema with this project's migrations (the charge comes from the replay of `generate`, the endings
from the project's own state functions)."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack.database import apply_sql, migrate
from sona.ops.stats import render_table
from tests.plugin.conftest import _gateway as plugin_gateway_over
from tests.plugin.generate import GenerateRequest, generate_over_sql, generate_through_gateway
from tests.plugin.plugin_db import (
    FAILED_DESIGNER,
    MUSICIAN,
    OLD_PENDING,
    PROCESSING_PRODUCER,
    QUEUED_DESIGNER,
    START_BALANCE,
    balance,
    transactions,
)
from tests.support import connect, insert_job, new_user, sql

BONUS = 500
DESIGNER = GenerateRequest("glass shattering on a concrete floor, close mic", 5, "high", "designer")  # 14
CREATOR = GenerateRequest("epic orchestral trailer music", 150, "medium", "creator", bpm=100)  # 33


def _generate(url: str, user: uuid.UUID, request: GenerateRequest = DESIGNER) -> uuid.UUID:
    """generate's charge and insert; asserts the state before the job ends: charged, nothing back."""
    before = balance(url, user)
    answer = generate_over_sql(url, user, request)
    assert answer.status == 201, answer.error
    assert answer.job is not None
    assert balance(url, user) == before - request.cost()
    last = transactions(url, user)[-1]
    assert (last["type"], last["amount"], last["description"]) == (
        "usage",
        -request.cost(),
        request.description(),
    )
    return uuid.UUID(str(answer.job["id"]))


def _claim(url: str, job_id: uuid.UUID) -> uuid.UUID:
    rows = sql(url, "select lease_token from public.claim_job(%s, gen_random_uuid(), 300, 3)", job_id)
    assert rows, "not claimed"
    return uuid.UUID(str(rows[0]["lease_token"]))


FAIL = "select * from public.fail_job(%s, %s, %s, %s, 3, 1000, 60000)"


def _fail(url: str, job_id: uuid.UUID, lease: uuid.UUID, retryable: bool = False) -> list[dict[str, Any]]:
    return sql(url, FAIL, job_id, lease, "The provider refused this prompt.", retryable)


def _complete(url: str, job_id: uuid.UUID, lease: uuid.UUID) -> None:
    done = "select id from public.complete_job(%s, %s, 'w.wav', 'p.mp3', '{}'::jsonb)"
    assert sql(url, done, job_id, lease)


def _cancel_as_owner(url: str, user: uuid.UUID, job_id: uuid.UUID) -> None:
    with connect(url, "authenticated", user) as conn:
        assert conn.execute("select id from public.cancel_job(%s)", (job_id,)).fetchall()


def _refunds(url: str, user: uuid.UUID) -> list[dict[str, Any]]:
    return [t for t in transactions(url, user) if t["type"] == "refund"]


def _kinds(url: str, user: uuid.UUID) -> list[tuple[str, int]]:
    return [(t["type"], t["amount"]) for t in transactions(url, user)]


def _token_stats(url: str) -> dict[str, Any]:
    rows = sql(url, "select public.token_stats(24) as figures")
    return dict(rows[0]["figures"])


# ------------------------------------------------------------------------------------ endings
def test_a_job_failing_permanently_refunds_its_charge_once(plugin_refunds_db_url: str) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    job = _generate(url, user)
    assert (balance(url, user), _kinds(url, user)) == (BONUS - 14, [("bonus", 500), ("usage", -14)])

    lease = _claim(url, job)
    assert _fail(url, job, lease)
    assert _fail(url, job, lease) == []  # a second, stale fail writes nothing

    assert balance(url, user) == BONUS
    assert _kinds(url, user) == [("bonus", 500), ("usage", -14), ("refund", 14)]
    assert str(job) in _refunds(url, user)[0]["description"]


def test_a_retry_refunds_nothing_and_the_final_failure_refunds_once(plugin_refunds_db_url: str) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    job = _generate(url, user)
    released = _fail(url, job, _claim(url, job), retryable=True)
    assert released[0]["status"] == "queued"  # the plug-in's job waits as it was inserted
    assert (balance(url, user), _refunds(url, user)) == (BONUS - 14, [])

    sql(url, "update public.jobs set run_after = null where id = %s", job)
    _fail(url, job, _claim(url, job))
    assert balance(url, user) == BONUS
    assert len(_refunds(url, user)) == 1


def test_a_job_whose_lost_lease_exhausts_its_attempts_is_refunded_by_reclaim(
    plugin_refunds_db_url: str,
) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    job = _generate(url, user)
    expire = (
        "update public.jobs set lease_expires_at = now() - interval '1 minute', run_after = null"
        " where id = %s"
    )
    for _ in range(2):  # the paid attempt, then the one finishing attempt reclaim allows
        sql(url, "select id from public.claim_job(%s, gen_random_uuid(), 300, 1)", job)
        sql(url, expire, job)
        sql(url, "select public.reclaim_and_dispatch(1, 0, 100, 1000, 60000)")
    assert sql(url, "select status from public.jobs where id = %s", job) == [{"status": "failed"}]
    assert balance(url, user) == BONUS
    assert len(_refunds(url, user)) == 1


@pytest.mark.parametrize(
    ("reached", "refunded"),
    [("queued", True), ("claimed", True), ("generating", False), ("encoding", False)],
)
def test_a_cancel_refunds_only_before_generation_began(
    plugin_refunds_db_url: str, reached: str, refunded: bool
) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    job = _generate(url, user)
    if reached != "queued":
        lease = _claim(url, job)
        if reached != "claimed":
            sql(url, "select id from public.advance_stage(%s, %s, 'generating')", job, lease)
            sql(url, "select id from public.advance_stage(%s, %s, %s)", job, lease, reached)
    _cancel_as_owner(url, user, job)

    assert balance(url, user) == (BONUS if refunded else BONUS - 14)
    assert _kinds(url, user)[2:] == ([("refund", 14)] if refunded else [])


def test_a_completed_job_keeps_its_tokens(plugin_refunds_db_url: str) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    job = _generate(url, user)
    _complete(url, job, _claim(url, job))
    assert (balance(url, user), _kinds(url, user)) == (BONUS - 14, [("bonus", 500), ("usage", -14)])
    settled = sql(url, "select settlement from public.sona_job_charges where job_id = %s", job)
    assert settled == [{"settlement": "kept"}]


def test_concurrent_duplicate_finishes_refund_once(plugin_refunds_db_url: str) -> None:
    """Two instances fail the same attempt at once: the second waits on the row, then matches
    nothing; a cancel racing them finds the job finished."""
    url = plugin_refunds_db_url
    user = new_user(url)
    job = _generate(url, user)
    lease = _claim(url, job)
    answers: list[int] = []

    with psycopg.connect(url) as first:
        first.execute("set role service_role")
        assert first.execute(FAIL, (job, lease, "first", False)).fetchall()  # holds the row

        def second() -> None:
            with psycopg.connect(url) as conn:
                conn.execute("set role service_role")
                answers.append(len(conn.execute(FAIL, (job, lease, "second", False)).fetchall()))

        racer = threading.Thread(target=second)
        racer.start()
        racer.join(timeout=0.5)
        assert racer.is_alive(), "the second finish should wait for the first's row lock"
        first.commit()
    racer.join(timeout=30)
    with connect(url, "authenticated", user) as conn:
        assert conn.execute("select id from public.cancel_job(%s)", (job,)).fetchall() == []

    assert answers == [0]
    assert balance(url, user) == BONUS
    assert len(_refunds(url, user)) == 1


# ------------------------------------------------------------------------------------ the link
def test_two_jobs_of_different_prices_in_one_second_each_get_their_own_charge(
    plugin_refunds_db_url: str,
) -> None:
    """Both charges first, then both inserts in the other order, at the same instant."""
    url = plugin_refunds_db_url
    user = new_user(url)
    for request in (DESIGNER, CREATOR):
        charge = "select public.use_tokens(%s, %s, %s) as ok"
        assert sql(url, charge, user, request.cost(), request.description())
    ids: dict[str, uuid.UUID] = {}
    created: set[Any] = set()
    with connect(url, "service_role") as conn:  # one transaction: the very same created_at
        for name, request in (("creator", CREATOR), ("designer", DESIGNER)):
            row = request.job_record(user)
            names = ", ".join(row)
            inserted = conn.execute(
                f"insert into public.jobs ({names}) select {names}"  # type: ignore[arg-type]
                " from json_populate_record(null::public.jobs, %s::json) returning id, created_at",
                (json.dumps(row),),
            ).fetchone()
            assert inserted is not None
            ids[name] = inserted["id"]
            created.add(inserted["created_at"])
    assert len(created) == 1
    links = sql(url, "select job_id, tokens from public.sona_job_charges where user_id = %s", user)
    assert {r["job_id"]: r["tokens"] for r in links} == {ids["designer"]: 14, ids["creator"]: 33}

    for job in ids.values():
        _fail(url, job, _claim(url, job))
    refunds = {t["amount"]: t["description"] for t in _refunds(url, user)}
    assert set(refunds) == {14, 33}
    assert str(ids["designer"]) in refunds[14] and str(ids["creator"]) in refunds[33]
    assert balance(url, user) == BONUS


def test_identical_requests_take_one_charge_each(plugin_refunds_db_url: str) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    jobs = [_generate(url, user) for _ in range(2)]
    links = sql(url, "select transaction_id from public.sona_job_charges where job_id = any(%s)", jobs)
    assert len({r["transaction_id"] for r in links}) == 2
    for job in jobs:
        _fail(url, job, _claim(url, job))
    assert balance(url, user) == BONUS


def test_a_job_whose_charge_is_not_found_is_refunded_nothing_and_counted(plugin_refunds_db_url: str) -> None:
    """A job nobody charged for (here: inserted directly, as an operator would) is never guessed."""
    url = plugin_refunds_db_url
    user = new_user(url)
    job = insert_job(url, user_id=user, prompt="door creak", duration=3, quality="low", mode="designer",
                     status="queued")  # fmt: skip
    _fail(url, job, _claim(url, job))
    assert (balance(url, user), _kinds(url, user)) == (BONUS, [("bonus", 500)])
    figures = _token_stats(url)
    assert (figures["charge_not_found"], figures["refunds"]) == (1, 0)


def test_a_database_without_token_tables_behaves_as_before(private_db_url: str) -> None:
    """The project's own database (no plug-in tables): the triggers do nothing, the job fails as ever."""
    url = private_db_url
    job = insert_job(url, prompt="warm pad", duration=5)
    lease = _claim(url, job)
    assert _fail(url, job, lease)[0]["status"] == "failed"
    assert sql(url, "select * from public.sona_job_charges") == []
    assert sql(url, "select to_regclass('public.token_transactions') as t") == [{"t": None}]
    assert _token_stats(url)["tokens_present"] is False


# ------------------------------------------------------------------------------------ quotas
def test_over_quota_on_the_service_role_path_the_job_fails_at_once_and_is_refunded(
    plugin_refunds_db_url: str, tmp_path: Path
) -> None:
    url = plugin_refunds_db_url
    sql(url, "insert into public.sona_settings (key, value) values ('max_active_jobs', 1)")
    user = new_user(url)
    gateway = plugin_gateway_over(url, tmp_path / "storage")
    gateway.start()
    try:
        first = generate_through_gateway(gateway, user, DESIGNER)
        second = generate_through_gateway(gateway, user, CREATOR)
    finally:
        gateway.stop()

    assert (first.status, second.status) == (201, 201)  # generate never sees a refusal
    assert second.job is not None and second.job["status"] == "failed"
    assert second.job["error_message"].startswith("You have 1 job running; wait for one to finish.")
    assert balance(url, user) == BONUS - 14
    assert _kinds(url, user) == [("bonus", 500), ("usage", -14), ("usage", -33), ("refund", 33)]


def test_a_service_role_insert_without_a_charge_stays_exempt_from_quotas(plugin_refunds_db_url: str) -> None:
    url = plugin_refunds_db_url
    sql(url, "insert into public.sona_settings (key, value) values ('max_active_jobs', 1)")
    user = new_user(url)
    _generate(url, user)
    job = insert_job(url, user_id=user, mode="designer", status="queued")
    assert sql(url, "select status from public.jobs where id = %s", job) == [{"status": "queued"}]


# ------------------------------------------------------------------------------------ operators
def test_stats_show_tokens_refunded_and_charges_not_found(plugin_refunds_db_url: str) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    refunded = _generate(url, user, CREATOR)
    _fail(url, refunded, _claim(url, refunded))
    _generate(url, user)
    insert_job(url, user_id=user, mode="designer", status="queued")

    figures = _token_stats(url)
    assert figures == {
        "tokens_present": True,
        "jobs_charged": 2,
        "tokens_charged": 47,
        "refunds": 1,
        "tokens_refunded": 33,
        "charge_not_found": 1,
        "refund_failed": 0,
    }
    table = render_table({"window_hours": 24, "total": 0, "by_status": {}, "tokens": figures})
    assert "tokens refunded     33 (1 jobs)" in table
    assert "charge not found    1 jobs" in table


# ------------------------------------------------------------------------------------ on deploy
def test_live_plugin_jobs_take_their_charges_when_the_migration_runs(plugin_db_url: str) -> None:
    """The plug-in's own database and the migrations: its queued and processing jobs get their
    charges; the old worker's failure then refunds; December's job had none to find."""
    url = plugin_db_url
    migrate(url)
    migrate(url)  # idempotent
    links = sql(url, "select job_id, tokens from public.sona_job_charges order by tokens nulls first")
    assert [(r["job_id"], r["tokens"]) for r in links] == [(OLD_PENDING, None), (QUEUED_DESIGNER, 14),
                                                           (PROCESSING_PRODUCER, 21)]  # fmt: skip
    assert FAILED_DESIGNER not in {r["job_id"] for r in links}

    old_worker_fails = "update public.jobs set status = 'failed', error_message = 'boom' where id = %s"
    sql(url, old_worker_fails, PROCESSING_PRODUCER)
    assert balance(url, MUSICIAN) == START_BALANCE[MUSICIAN] + 21


@pytest.mark.parametrize(
    ("status", "record", "refunded"),
    [
        ("queued", None, True),
        ("processing", None, True),
        ("processing", "provider_called_at", False),
        ("processing", "provider_paid_at", False),
    ],
)
def test_a_user_marking_their_own_job_failed_counts_as_a_cancel(
    plugin_db_url: str, status: str, record: str | None, refunded: bool
) -> None:
    """The plug-in lets an owner update their job: a 'failed' they write refunds only a job for which
    the worker's records show no provider call. jobs_guard and jobs_guard_request refuse that write
    first; this is the wall behind them, so they are held off here as if a policy of the plug-in's
    let the write through."""
    url = plugin_db_url
    migrate(url)
    job = QUEUED_DESIGNER if status == "queued" else PROCESSING_PRODUCER
    if record is not None:  # what advance_stage / record_generation write on the attempt
        attempt = f"insert into public.job_attempts (job_id, attempt, lease_token, {record})"
        sql(url, attempt + " values (%s, 1, gen_random_uuid(), now())", job, role=None)
    apply_sql(url, "alter table public.jobs disable trigger jobs_guard, disable trigger jobs_guard_request")
    with connect(url, "authenticated", MUSICIAN) as conn:
        conn.execute("update public.jobs set status = 'failed' where id = %s", (job,))
    tokens = 14 if status == "queued" else 21
    assert balance(url, MUSICIAN) == START_BALANCE[MUSICIAN] + (tokens if refunded else 0)


def test_the_stage_a_row_says_it_reached_refunds_nothing_by_itself(plugin_db_url: str) -> None:
    """Issue 29: the owner could write the stage; only the worker's records decide a refund."""
    url = plugin_db_url
    migrate(url)
    sql(url, "update public.jobs set stage = 'claimed' where id = %s", PROCESSING_PRODUCER, role=None)
    sql(url, "insert into public.job_attempts (job_id, attempt, lease_token, provider_called_at)"
             " values (%s, 1, gen_random_uuid(), now())", PROCESSING_PRODUCER, role=None)  # fmt: skip
    with connect(url, "authenticated", MUSICIAN) as conn:
        assert conn.execute("select id from public.cancel_job(%s)", (PROCESSING_PRODUCER,)).fetchall()
    assert balance(url, MUSICIAN) == START_BALANCE[MUSICIAN]


@pytest.mark.parametrize(
    ("attempt", "row", "spend"),
    [
        (None, "", "none"),
        ("provider_called_at", "", "called"),
        ("provider_paid_at", "", "paid"),
        (None, "generation_id = 'g1'", "paid"),
        (None, "generations_lost = 1", "paid"),
    ],
)
def test_the_workers_records_say_what_was_spent_on_a_job(
    db_url: str, attempt: str | None, row: str, spend: str
) -> None:
    """What replaced the stage-based sona_generation_began: job_attempts (no user reaches it) and the
    generation the worker recorded on the row (jobs_guard keeps users off those columns)."""
    job = insert_job(db_url, status="processing", lease_token=uuid.uuid4())
    if attempt is not None:
        record = f"insert into public.job_attempts (job_id, attempt, lease_token, {attempt})"
        sql(db_url, record + " values (%s, 1, gen_random_uuid(), now())", job)
    if row:
        sql(db_url, f"update public.jobs set {row} where id = %s", job, role=None)
    assert sql(db_url, "select public.sona_provider_spend(%s) as spend", job) == [{"spend": spend}]
