"""process_job in-process (functions-framework's create_app(...).test_client()), against the local
gateway, the Stable Audio double and real ffmpeg."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from devstack.doubles.stable_audio_double import Behaviour, StableAudioDouble
from devstack.emulators.gateway import Gateway, gateway_error, gateway_error_page
from sona.messages import MESSAGES
from sona.services import reset_services
from sona.store.storage import AudioStorage
from tests.support import SECRETS, insert_job, job_row, reclaimed, sql

MAIN = str(Path(__file__).resolve().parents[1] / "main.py")


@pytest.fixture
def client(
    gateway: Gateway, double: StableAudioDouble, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FlaskClient]:
    env = {
        "SUPABASE_URL": gateway.url,
        "SUPABASE_SERVICE_ROLE_KEY": gateway.service_role_key,
        "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
        "STABLE_AUDIO_API_URL": double.url,
        "WEBHOOK_SECRET": SECRETS["webhook_secret"],
        "RETRY_DELAY_MS": "50",
        "LOG_FORMAT": "text",
        "DISPATCH": "direct",  # the webhook's call runs the job; Cloud Tasks: tests/test_task_runs.py
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_services()
    AudioStorage._public.clear()
    yield create_app(target="process_job", source=MAIN).test_client()
    reset_services()


def payload(job_id: object, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "INSERT",
        "table": "jobs",
        "schema": "public",
        "record": {"id": str(job_id), "status": "pending"},
        "old_record": None,
    }
    body.update(changes)
    return body


def post(
    client: FlaskClient, body: Any, secret: str | None = SECRETS["webhook_secret"], **kwargs: Any
) -> Any:
    headers = {"X-Webhook-Secret": secret} if secret is not None else {}
    if "data" not in kwargs:
        kwargs["json"] = body
    return client.post("/", headers=headers, **kwargs)


def paused_by(db_url: str) -> list[str]:
    """The codes of the open pauses (one at most)."""
    return [r["code"] for r in sql(db_url, "select code from sona_pauses where lifted_at is null")]


def snapshot(db_url: str) -> list[dict[str, Any]]:
    return sql(
        db_url,
        "select j.*, (select count(*) from job_attempts a where a.job_id = j.id) as n"
        " from jobs j order by id",
        role=None,
    )


def test_a_job_is_claimed_generated_stored_and_completed(
    client: FlaskClient, db_url: str, double: StableAudioDouble
) -> None:
    job_id = insert_job(db_url, duration=3, quality="high")
    response = post(client, payload(job_id))
    body = response.get_json()
    assert response.status_code == 200, body
    assert (body["job_id"], body["outcome"], body["attempt"], body["status"]) == (
        str(job_id),
        "completed",
        1,
        "completed",
    )
    assert {"generate", "encode_mp3", "upload", "complete", "total"} <= set(body["timings_ms"])
    row = job_row(db_url, job_id)
    assert row["status"] == "completed"
    assert row["result_url"] == row["mp3_url"]
    assert row["audio"]["duration_s"] == 3.0
    assert double.paid_generations == 1
    assert double.calls[0].fields["steps"] == "8"


def test_a_second_delivery_is_skipped_without_a_provider_call(
    client: FlaskClient, db_url: str, double: StableAudioDouble
) -> None:
    job_id = insert_job(db_url, duration=1)
    post(client, payload(job_id))
    response = post(client, payload(job_id))
    assert response.status_code == 200
    assert response.get_json()["outcome"] == "skipped"
    assert double.call_count == 1


def test_a_moderated_prompt_fails_the_job_with_a_readable_message(
    client: FlaskClient, db_url: str, double: StableAudioDouble
) -> None:
    double.script(Behaviour("error", 403))
    job_id = insert_job(db_url, duration=1)
    body = post(client, payload(job_id)).get_json()
    assert (body["outcome"], body["status"]) == ("failed", "failed")
    row = job_row(db_url, job_id)
    assert row["error_message"] == MESSAGES["moderation"]
    assert double.call_count == 1


def test_an_html_403_from_the_providers_edge_releases_the_job_without_blaming_the_prompt(
    client: FlaskClient, db_url: str, double: StableAudioDouble
) -> None:
    double.script(Behaviour("html403"))
    job_id = insert_job(db_url, duration=1)
    body = post(client, payload(job_id)).get_json()
    assert (body["outcome"], body["status"]) == ("paused", "pending")  # the account, not the job
    assert (job_row(db_url, job_id)["attempts"], paused_by(db_url)) == (0, ["provider_edge_refused"])
    assert job_row(db_url, job_id)["error_message"] == MESSAGES["service_unavailable"]
    assert double.call_count == 1


def test_a_transient_provider_failure_releases_the_job_for_a_retry(
    client: FlaskClient, db_url: str, double: StableAudioDouble
) -> None:
    double.script(*[Behaviour("error", 503)] * 4)
    job_id = insert_job(db_url, duration=1)
    body = post(client, payload(job_id)).get_json()
    assert (body["outcome"], body["status"]) == ("retrying", "pending")
    row = job_row(db_url, job_id)
    assert row["run_after"] is not None
    assert row["error_message"] == "The audio service had a temporary problem"


def test_a_bucket_the_project_refuses_releases_the_job_before_paying_and_blames_no_one(
    client: FlaskClient, db_url: str, double: StableAudioDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gateway plays a Free plan project (50 MB global limit); the bucket asks for 100 MB.
    monkeypatch.setenv("STORAGE_FILE_SIZE_LIMIT", "100MB")
    reset_services()
    job_id = insert_job(db_url, duration=1)
    body = post(client, payload(job_id)).get_json()
    assert (body["outcome"], body["status"]) == ("paused", "pending")
    row = job_row(db_url, job_id)
    assert (row["attempts"], paused_by(db_url)) == (0, ["storage_bucket_refused"])
    assert row["error_message"] == MESSAGES["service_unavailable"]
    assert double.call_count == 0


def test_an_update_to_pending_is_accepted(client: FlaskClient, db_url: str) -> None:
    job_id = insert_job(db_url, duration=1)
    body = post(client, payload(job_id, type="UPDATE", old_record={"status": "failed"})).get_json()
    assert body["outcome"] == "completed"


def test_an_unreachable_database_is_a_503_and_the_row_is_untouched(
    client: FlaskClient, db_url: str, gateway: Gateway
) -> None:
    job_id = insert_job(db_url, duration=1)
    before = snapshot(db_url)
    gateway.faults.down.add("*")
    response = post(client, payload(job_id))
    assert response.status_code == 503
    assert response.get_json()["error"] == "database_unavailable"
    assert snapshot(db_url) == before


BAD_REQUESTS = [
    ("no secret", {"secret": None}, 401, "unauthorized"),
    ("wrong secret", {"secret": "wrong"}, 401, "unauthorized"),
    (
        "secret off by its last character",
        {"secret": SECRETS["webhook_secret"][:-1] + "X"},
        401,
        "unauthorized",
    ),
    ("empty secret", {"secret": ""}, 401, "unauthorized"),
    ("not json", {"data": "hello", "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ("invalid json", {"data": "{nope", "content_type": "application/json"}, 400, "invalid_json"),
    ("empty body", {"data": "", "content_type": "application/json"}, 400, "invalid_json"),
    ("json array", {"body": [1, 2]}, 422, "invalid_payload"),
    ("wrong table", {"changes": {"table": "users"}}, 422, "wrong_table"),
    ("wrong schema", {"changes": {"schema": "auth"}}, 422, "wrong_table"),
    ("delete event", {"changes": {"type": "DELETE"}}, 422, "invalid_payload"),
    ("no record", {"changes": {"record": None}}, 422, "invalid_payload"),
    ("no record id", {"changes": {"record": {"status": "pending"}}}, 422, "invalid_payload"),
    ("record id not a uuid", {"changes": {"record": {"id": "42"}}}, 422, "invalid_payload"),
    (
        "update to completed",
        {"changes": {"type": "UPDATE", "record": {"id": "ID", "status": "completed"}}},
        422,
        "not_claimable",
    ),
    (
        "body over 1 MB",
        {"data": "{" + " " * 1_000_001 + "}", "content_type": "application/json"},
        413,
        "payload_too_large",
    ),
]


@pytest.mark.parametrize(
    ("case", "request_parts", "status", "error"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_a_bad_request_gets_its_status_and_a_json_error_and_changes_nothing(
    client: FlaskClient,
    db_url: str,
    double: StableAudioDouble,
    case: str,
    request_parts: dict[str, Any],
    status: int,
    error: str,
) -> None:
    job_id = insert_job(db_url)
    before = snapshot(db_url)
    body = request_parts.get("body", payload(job_id, **request_parts.get("changes", {})))
    if isinstance(body, dict) and isinstance(body.get("record"), dict) and body["record"].get("id") == "ID":
        body["record"]["id"] = str(job_id)
    kwargs = {k: v for k, v in request_parts.items() if k in ("data", "content_type")}
    response = post(client, body, request_parts.get("secret", SECRETS["webhook_secret"]), **kwargs)
    assert response.status_code == status
    assert response.get_json()["error"] == error
    assert response.get_json()["message"]
    assert snapshot(db_url) == before
    assert double.call_count == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_methods_other_than_post_get_405(client: FlaskClient, method: str) -> None:
    response = client.open("/", method=method, headers={"X-Webhook-Secret": SECRETS["webhook_secret"]})
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("status", ["completed", "failed", "processing"])
def test_a_job_that_is_not_claimable_is_skipped(client: FlaskClient, db_url: str, status: str) -> None:
    job_id = insert_job(db_url, status=status)
    before = snapshot(db_url)
    body = post(client, payload(job_id)).get_json()
    assert body["outcome"] == "skipped"
    assert snapshot(db_url) == before


def test_an_unknown_id_is_skipped(client: FlaskClient, db_url: str) -> None:
    body = post(client, payload(uuid.uuid4())).get_json()
    assert body["outcome"] == "skipped"
    assert json.dumps(body)


def test_a_missing_ffmpeg_is_a_clear_500_before_anything_is_claimed(
    client: FlaskClient, db_url: str, double: StableAudioDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FFMPEG_BINARY", "/nonexistent/ffmpeg")
    reset_services()
    job_id = insert_job(db_url)
    before = snapshot(db_url)
    response = post(client, payload(job_id))
    assert response.status_code == 500
    assert response.get_json() == {
        "error": "ffmpeg_missing",
        "message": "FFMPEG_BINARY=/nonexistent/ffmpeg is not an executable ffmpeg",
    }
    assert snapshot(db_url) == before
    assert double.call_count == 0


def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_all(client: FlaskClient) -> None:
    # No Content-Length, as with chunked transfer (gunicorn marks such input as terminated).
    body = io.BytesIO(b"{" + b" " * 2_000_000 + b"}")
    response = client.post(
        "/",
        input_stream=body,
        content_type="application/json",
        headers={"X-Webhook-Secret": SECRETS["webhook_secret"]},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"


# -- answers that are not the job's fault ---------------------------------------------------------

# The API gateway's own answers, with no PostgREST code: (name, FaultPlan.add arguments)
GATEWAY_FAILURES: list[tuple[str, dict[str, Any]]] = [
    ("502", gateway_error(502)),
    ("503", gateway_error(503)),
    ("504", gateway_error(504)),
    ("HTML page", gateway_error_page(502)),
]
GATEWAY_IDS = [c[0] for c in GATEWAY_FAILURES]
MAX_TRIES = 4  # MAX_RETRIES=3 retries of one call


def expire_and_reclaim(db_url: str, job_id: uuid.UUID) -> dict[str, Any]:
    """What Cloud Scheduler's reclaim does once the lease has expired, then the backoff waited out."""
    sql(db_url, "update jobs set lease_expires_at = now() - interval '1 s' where id = %s", job_id, role=None)
    done = reclaimed(db_url, 3, 60, 100, 50, 1000)
    sql(db_url, "update jobs set run_after = null where id = %s", job_id, role=None)
    return done


@pytest.mark.parametrize(("name", "fault"), GATEWAY_FAILURES, ids=GATEWAY_IDS)
def test_a_gateway_failure_on_claim_is_a_503_and_the_row_is_untouched(
    client: FlaskClient,
    db_url: str,
    gateway: Gateway,
    double: StableAudioDouble,
    name: str,
    fault: dict[str, Any],
) -> None:
    job_id = insert_job(db_url, duration=1)
    before = snapshot(db_url)
    gateway.faults.add("rpc:claim_job", **fault, times=MAX_TRIES)
    response = post(client, payload(job_id))
    assert (response.status_code, response.get_json()["error"]) == (503, "database_unavailable")
    assert snapshot(db_url) == before
    assert double.call_count == 0


@pytest.mark.parametrize(("name", "fault"), GATEWAY_FAILURES, ids=GATEWAY_IDS)
def test_a_gateway_failure_on_complete_is_retried_and_the_job_completes(
    client: FlaskClient,
    db_url: str,
    gateway: Gateway,
    double: StableAudioDouble,
    name: str,
    fault: dict[str, Any],
) -> None:
    job_id = insert_job(db_url, duration=1)
    gateway.faults.add("rpc:complete_job", **fault)
    body = post(client, payload(job_id)).get_json()
    assert (body["outcome"], body["status"], body["attempt"]) == ("completed", "completed", 1)
    assert double.paid_generations == 1


def test_a_statement_timeout_on_complete_is_retried_and_the_job_completes(
    client: FlaskClient, db_url: str, gateway: Gateway, double: StableAudioDouble
) -> None:
    timeout = {
        "code": "57014",
        "details": None,
        "hint": None,
        "message": "canceling statement due to statement timeout",
    }
    job_id = insert_job(db_url, duration=1)
    gateway.faults.add("rpc:complete_job", 500, timeout)
    body = post(client, payload(job_id)).get_json()
    assert (body["outcome"], body["status"]) == ("completed", "completed")
    assert double.paid_generations == 1


def test_a_gateway_failure_when_recording_a_failure_is_retried(
    client: FlaskClient, db_url: str, gateway: Gateway, double: StableAudioDouble
) -> None:
    double.script(Behaviour("error", 403))
    job_id = insert_job(db_url, duration=1)
    gateway.faults.add("rpc:fail_job", **gateway_error(502))
    body = post(client, payload(job_id)).get_json()
    assert (body["outcome"], body["status"]) == ("failed", "failed")
    assert "content moderation" in job_row(db_url, job_id)["error_message"]


@pytest.mark.parametrize(("attempts_before", "paid_attempts_left"), [(0, True), (2, False)])
def test_a_stored_output_whose_completion_never_got_through_is_completed_by_the_next_attempt(
    client: FlaskClient,
    db_url: str,
    gateway: Gateway,
    double: StableAudioDouble,
    attempts_before: int,
    paid_attempts_left: bool,
) -> None:
    job_id = insert_job(db_url, duration=1, attempts=attempts_before)
    gateway.faults.add("rpc:complete_job", **gateway_error(502), times=MAX_TRIES)
    first = post(client, payload(job_id))
    assert (first.status_code, first.get_json()["outcome"]) == (503, "interrupted")
    assert job_row(db_url, job_id)["status"] == "processing"  # paid and stored, not failed

    assert expire_and_reclaim(db_url, job_id)["released"] == 1  # the one job there is
    second = post(client, payload(job_id, type="UPDATE")).get_json()

    assert (second["outcome"], second["status"]) == ("completed", "completed")
    row = job_row(db_url, job_id)
    assert (row["attempts"], row["reuse_only"]) == (attempts_before + 2, not paid_attempts_left)
    assert double.paid_generations == 1  # the second attempt reused the stored files


def test_a_finishing_attempt_with_no_stored_output_fails_without_paying(
    client: FlaskClient, db_url: str, double: StableAudioDouble
) -> None:
    # The last paid attempt died before storing anything (its process was killed).
    job_id = insert_job(db_url, duration=1, status="processing", attempts=3, lease_token=uuid.uuid4())
    expire_and_reclaim(db_url, job_id)
    body = post(client, payload(job_id, type="UPDATE")).get_json()
    assert (body["outcome"], body["status"]) == ("failed", "failed")
    assert job_row(db_url, job_id)["error_message"] == "The job timed out after 3 attempts."
    assert double.call_count == 0


def test_a_claim_whose_answer_was_lost_keeps_its_lease_and_the_job_completes(
    client: FlaskClient, db_url: str, gateway: Gateway, double: StableAudioDouble
) -> None:
    job_id = insert_job(db_url, duration=1)
    gateway.faults.add("rpc:claim_job", **gateway_error(502), after=True)
    body = post(client, payload(job_id)).get_json()
    assert (body["outcome"], body["status"], body["attempt"]) == ("completed", "completed", 1)
    assert job_row(db_url, job_id)["attempts"] == 1
    assert double.paid_generations == 1


@pytest.mark.parametrize("kind", ["publishable_key", "anon_key"])
def test_the_first_request_with_an_anon_or_publishable_key_claims_nothing_and_says_why(
    client: FlaskClient,
    gateway: Gateway,
    db_url: str,
    double: StableAudioDouble,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    key = getattr(gateway, kind)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", key)
    reset_services()
    job_id = insert_job(db_url, duration=1)
    response = post(client, payload(job_id))
    assert (response.status_code, response.get_json()["error"]) == (500, "misconfigured")
    assert job_row(db_url, job_id)["status"] == "pending"
    assert gateway.counts["rpc:claim_job"] == 0 and double.call_count == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "SUPABASE_SERVICE_ROLE_KEY" in logged and "row level security" in logged
    assert key not in logged
