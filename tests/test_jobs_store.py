"""The jobs store over HTTP: sona.store.rpc (PostgREST RPC over urllib3) -> the local gateway ->
PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from devstack.emulators.gateway import Gateway, gateway_error, gateway_error_page
from sona.errors import Cancelled, DatabaseUnavailable, StaleLease, StoreError
from sona.models import JobStage, JobStatus
from sona.rows import Output
from sona.store.jobs import DueJob, JobsStore, Reclaimed
from tests.support import AUDIO_INFO as INFO
from tests.support import insert_job, job_row, make_settings, sql


@pytest.fixture
def store(gateway: Gateway) -> JobsStore:
    return JobsStore(
        make_settings(
            supabase_url=gateway.url,
            supabase_service_role_key=gateway.service_role_key,
            retry_delay_ms=40,
        )
    )


STATEMENT_TIMEOUT = {
    "code": "57014",
    "details": None,
    "hint": None,
    "message": "canceling statement due to statement timeout",
}

# Answers that are not the job's fault: (name, FaultPlan.add arguments). Each says "not now".
NOT_NOW: list[tuple[str, dict[str, Any]]] = [
    ("gateway 502", gateway_error(502)),
    ("gateway 503", gateway_error(503)),
    ("gateway 504", gateway_error(504)),
    ("gateway HTML page", gateway_error_page(502)),
    ("empty 502", {"status": 0, "body": None}),
    ("statement timeout", {"status": 500, "body": STATEMENT_TIMEOUT}),
]


def test_claim_returns_a_typed_job_with_its_lease(store: JobsStore, db_url: str) -> None:
    job_id = insert_job(db_url, prompt="rain on a tin roof", duration=7)
    job = store.claim(job_id, uuid.uuid4())
    assert job is not None
    assert (job.id, job.status, job.attempts, job.duration) == (job_id, JobStatus.PROCESSING, 1, 7)
    assert job.lease_token is not None


def test_second_claim_returns_none(store: JobsStore, db_url: str) -> None:
    job_id = insert_job(db_url)
    assert store.claim(job_id, uuid.uuid4()) is not None
    assert store.claim(job_id, uuid.uuid4()) is None


def test_complete_stores_urls_and_audio_info(store: JobsStore, db_url: str) -> None:
    job = store.claim(insert_job(db_url), uuid.uuid4())
    assert job is not None
    done = store.complete(job, Output("http://s/a.wav", "http://s/a.mp3", INFO))
    assert done.status == JobStatus.COMPLETED
    assert done.result_url == "http://s/a.mp3"
    assert job_row(db_url, job.id)["audio"]["sample_rate"] == 44100


@pytest.mark.parametrize(("retryable", "status"), [(False, "failed"), (True, "pending")])
def test_fail_fails_or_releases(store: JobsStore, db_url: str, retryable: bool, status: str) -> None:
    job = store.claim(insert_job(db_url), uuid.uuid4())
    assert job is not None
    row = store.fail(job, message="nope", retryable=retryable)
    assert (row.status, row.error_message) == (status, "nope")


def test_a_stale_worker_gets_stale_lease_and_changes_nothing(store: JobsStore, db_url: str) -> None:
    job = store.claim(insert_job(db_url), uuid.uuid4())
    assert job is not None
    sql(db_url, "update jobs set lease_expires_at = now() - interval '1 s' where id = %s", job.id, role=None)
    store.reclaim()
    sql(db_url, "update jobs set run_after = null where id = %s", job.id, role=None)
    fresh = store.claim(job.id, uuid.uuid4())
    assert fresh is not None

    with pytest.raises(StaleLease):
        store.complete(job, Output("http://stale", "http://stale", INFO))
    with pytest.raises(StaleLease):
        store.fail(job, message="stale", retryable=False)
    row = job_row(db_url, job.id)
    assert (row["status"], row["lease_token"], row["wav_url"]) == ("processing", fresh.lease_token, None)


def test_the_stage_fence_tells_a_cancelled_job_from_a_reclaimed_lease(store: JobsStore, db_url: str) -> None:
    cancelled = store.claim(insert_job(db_url), uuid.uuid4())
    assert cancelled is not None
    sql(db_url, "select * from cancel_job(%s)", cancelled.id)
    with pytest.raises(Cancelled):
        store.advance(cancelled, JobStage.GENERATING)
    assert job_row(db_url, cancelled.id)["status"] == "cancelled"

    reclaimed = store.claim(insert_job(db_url), uuid.uuid4())
    assert reclaimed is not None
    sql(db_url, "update jobs set lease_token = gen_random_uuid() where id = %s", reclaimed.id, role=None)
    with pytest.raises(StaleLease) as stale:
        store.advance(reclaimed, JobStage.GENERATING)
    assert not isinstance(stale.value, Cancelled)


def test_reclaim_returns_typed_counts_and_the_jobs_to_dispatch(store: JobsStore, db_url: str) -> None:
    job_id = insert_job(db_url)
    sql(db_url, "update jobs set created_at = now() - interval '1 hour' where id = %s", job_id, role=None)
    assert store.reclaim() == Reclaimed(
        released=0, failed=0, dispatch=[DueJob(job_id=job_id, attempt=0, dispatch_round=1)]
    )


def test_database_down_is_database_unavailable(store: JobsStore, gateway: Gateway, db_url: str) -> None:
    job_id = insert_job(db_url)
    gateway.faults.down.add("*")
    with pytest.raises(DatabaseUnavailable):
        store.claim(job_id, uuid.uuid4())
    assert job_row(db_url, job_id)["status"] == "pending"


def test_gateway_unreachable_is_database_unavailable(db_url: str) -> None:
    store = JobsStore(make_settings(supabase_url="http://127.0.0.1:9", retry_delay_ms=40))
    with pytest.raises(DatabaseUnavailable):
        store.claim(insert_job(db_url), uuid.uuid4())


def test_a_missing_function_is_a_store_error(private_db_url: str, tmp_path: Path) -> None:
    sql(private_db_url, "drop function public.claim_job(uuid, uuid, integer, integer)", role=None)
    gw = Gateway(private_db_url, tmp_path, service_role_key="svc", anon_key="anon", jwt_secret="j")
    gw.start()
    try:
        store = JobsStore(make_settings(supabase_url=gw.url, supabase_service_role_key="svc"))
        with pytest.raises(StoreError):
            store.claim(insert_job(private_db_url), uuid.uuid4())
    finally:
        gw.stop()


def test_a_wrong_key_is_a_store_error(gateway: Gateway, db_url: str) -> None:
    store = JobsStore(make_settings(supabase_url=gateway.url, supabase_service_role_key="wrong-key"))
    with pytest.raises(StoreError):
        store.claim(insert_job(db_url), uuid.uuid4())


@pytest.mark.parametrize(("name", "fault"), NOT_NOW, ids=[c[0] for c in NOT_NOW])
def test_an_answer_that_is_not_the_jobs_fault_on_claim_is_unavailable_and_leaves_the_row(
    store: JobsStore, gateway: Gateway, db_url: str, name: str, fault: dict[str, Any]
) -> None:
    job_id = insert_job(db_url)
    before = job_row(db_url, job_id)
    gateway.faults.add("rpc:claim_job", **fault, times=10)
    with pytest.raises(DatabaseUnavailable):
        store.claim(job_id, uuid.uuid4())
    assert job_row(db_url, job_id) == before


@pytest.mark.parametrize(("name", "fault"), NOT_NOW, ids=[c[0] for c in NOT_NOW])
@pytest.mark.parametrize("verb", ["complete", "fail"])
def test_an_answer_that_is_not_the_jobs_fault_on_complete_or_fail_is_unavailable(
    store: JobsStore, gateway: Gateway, db_url: str, verb: str, name: str, fault: dict[str, Any]
) -> None:
    job = store.claim(insert_job(db_url), uuid.uuid4())
    assert job is not None
    gateway.faults.add(f"rpc:{verb}_job", **fault)
    writes = {
        "complete": lambda: store.complete(job, Output("http://s/a.wav", "http://s/a.mp3", INFO)),
        "fail": lambda: store.fail(job, message="nope", retryable=False),
    }
    with pytest.raises(DatabaseUnavailable):
        writes[verb]()
    assert job_row(db_url, job.id)["status"] == "processing"


def test_a_claim_retries_a_gateway_blip_with_the_same_claim_id(
    store: JobsStore, gateway: Gateway, db_url: str
) -> None:
    job_id, claim_id = insert_job(db_url), uuid.uuid4()
    gateway.faults.add("rpc:claim_job", **gateway_error(502), times=2)
    job = store.claim(job_id, claim_id)
    assert job is not None
    assert (job.lease_token, job.attempts) == (claim_id, 1)


def test_a_claim_the_database_stays_away_from_is_tried_max_retries_plus_one_times(
    store: JobsStore, gateway: Gateway, db_url: str
) -> None:
    # The first try is made before the retry policy exists (a cold start's claim skips tenacity);
    # the policy still counts it as its own.
    gateway.faults.add("rpc:claim_job", **gateway_error(503), times=10)
    with pytest.raises(DatabaseUnavailable):
        store.claim(insert_job(db_url), uuid.uuid4())
    assert gateway.counts["rpc:claim_job"] == make_settings().max_retries + 1


def test_a_claim_whose_answer_was_lost_gets_the_same_lease_on_its_retry(
    store: JobsStore, gateway: Gateway, db_url: str
) -> None:
    job_id, claim_id = insert_job(db_url), uuid.uuid4()
    gateway.faults.add("rpc:claim_job", **gateway_error(502), after=True)
    job = store.claim(job_id, claim_id)
    assert job is not None
    assert (job.lease_token, job.attempts) == (claim_id, 1)
    assert gateway.counts["rpc:claim_job"] == 2
    assert sql(db_url, "select attempt from job_attempts where job_id = %s", job_id) == [{"attempt": 1}]


# A refused request is not an outage: retrying it cannot help. (status, body, content type)
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("gateway's invalid API key", {"status": 401, "body": {"message": "Invalid API key"}}),
    ("PostgREST internal error", {"status": 500, "body": {"code": "XX000", "message": "internal error"}}),
    ("plain-text 404", {"status": 404, "body": "Not Found", "content_type": "text/plain"}),
]


@pytest.mark.parametrize(("name", "fault"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_refusal_is_a_store_error_and_is_not_retried(
    store: JobsStore, gateway: Gateway, db_url: str, name: str, fault: dict[str, Any]
) -> None:
    gateway.faults.add("rpc:claim_job", **fault)
    with pytest.raises(StoreError):
        store.claim(insert_job(db_url), uuid.uuid4())
    assert gateway.counts["rpc:claim_job"] == 1
