"""The jobs store over HTTP: supabase-py's postgrest client -> the local gateway -> PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from sona.errors import DatabaseUnavailable, StaleLease
from sona.jobs_store import JobsStore, StoreError
from sona.local.gateway import Gateway
from sona.models import JobStatus
from tests.support import AUDIO_INFO as INFO
from tests.support import insert_job, job_row, make_settings, sql


@pytest.fixture
def store(gateway: Gateway) -> JobsStore:
    return JobsStore(
        make_settings(supabase_url=gateway.url, supabase_service_role_key=gateway.service_role_key)
    )


def test_claim_returns_a_typed_job_with_its_lease(store: JobsStore, db_url: str) -> None:
    job_id = insert_job(db_url, prompt="rain on a tin roof", duration=7)
    job = store.claim(job_id)
    assert job is not None
    assert (job.id, job.status, job.attempts, job.duration) == (job_id, JobStatus.PROCESSING, 1, 7)
    assert job.lease_token is not None


def test_second_claim_returns_none(store: JobsStore, db_url: str) -> None:
    job_id = insert_job(db_url)
    assert store.claim(job_id) is not None
    assert store.claim(job_id) is None


def test_complete_stores_urls_and_audio_info(store: JobsStore, db_url: str) -> None:
    job = store.claim(insert_job(db_url))
    assert job is not None
    done = store.complete(job, wav_url="http://s/a.wav", mp3_url="http://s/a.mp3", audio=INFO)
    assert done.status == JobStatus.COMPLETED
    assert done.result_url == "http://s/a.mp3"
    assert job_row(db_url, job.id)["audio"]["sample_rate"] == 44100


@pytest.mark.parametrize(("retryable", "status"), [(False, "failed"), (True, "pending")])
def test_fail_fails_or_releases(store: JobsStore, db_url: str, retryable: bool, status: str) -> None:
    job = store.claim(insert_job(db_url))
    assert job is not None
    row = store.fail(job, message="nope", retryable=retryable)
    assert (row.status, row.error_message) == (status, "nope")


def test_a_stale_worker_gets_stale_lease_and_changes_nothing(store: JobsStore, db_url: str) -> None:
    job = store.claim(insert_job(db_url))
    assert job is not None
    sql(db_url, "update jobs set lease_expires_at = now() - interval '1 s' where id = %s", job.id, role=None)
    store.reclaim()
    sql(db_url, "update jobs set run_after = null where id = %s", job.id, role=None)
    fresh = store.claim(job.id)
    assert fresh is not None

    with pytest.raises(StaleLease):
        store.complete(job, wav_url="http://stale", mp3_url="http://stale", audio=INFO)
    with pytest.raises(StaleLease):
        store.fail(job, message="stale", retryable=False)
    row = job_row(db_url, job.id)
    assert (row["status"], row["lease_token"], row["wav_url"]) == ("processing", fresh.lease_token, None)


def test_reclaim_returns_typed_actions(store: JobsStore, db_url: str) -> None:
    job_id = insert_job(db_url)
    sql(db_url, "update jobs set created_at = now() - interval '1 hour' where id = %s", job_id, role=None)
    assert [(a.job_id, a.action) for a in store.reclaim()] == [(job_id, "dispatch")]


def test_database_down_is_database_unavailable(store: JobsStore, gateway: Gateway, db_url: str) -> None:
    job_id = insert_job(db_url)
    gateway.faults.down.add("*")
    with pytest.raises(DatabaseUnavailable):
        store.claim(job_id)
    assert job_row(db_url, job_id)["status"] == "pending"


def test_gateway_unreachable_is_database_unavailable(db_url: str) -> None:
    store = JobsStore(make_settings(supabase_url="http://127.0.0.1:9"))
    with pytest.raises(DatabaseUnavailable):
        store.claim(insert_job(db_url))


def test_a_missing_function_is_a_store_error(private_db_url: str, tmp_path: Path) -> None:
    sql(private_db_url, "drop function public.claim_job(uuid, integer, integer)", role=None)
    gw = Gateway(private_db_url, tmp_path, service_role_key="svc", anon_key="anon", jwt_secret="j")
    gw.start()
    try:
        store = JobsStore(make_settings(supabase_url=gw.url, supabase_service_role_key="svc"))
        with pytest.raises(StoreError):
            store.claim(insert_job(private_db_url))
    finally:
        gw.stop()


def test_a_wrong_key_is_a_store_error(gateway: Gateway, db_url: str) -> None:
    store = JobsStore(make_settings(supabase_url=gateway.url, supabase_service_role_key="wrong-key"))
    with pytest.raises(StoreError):
        store.claim(insert_job(db_url))
