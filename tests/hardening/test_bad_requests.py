"""Bad requests to the real process_job and reclaim_jobs servers: each gets its documented status
and a JSON error, and the database is byte-for-byte unchanged."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import requests

from devstack.stack import LocalStack
from tests.hardening.conftest import SENTINELS, Ledger
from tests.support import insert_job, sql

SECRET = SENTINELS["WEBHOOK_SECRET"]
GOOD = object()  # stands for "the valid payload for this case's job"


def snapshot(stack: LocalStack) -> str:
    rows = sql(
        stack.database_url,
        """
        select coalesce(json_agg(t order by t::text), '[]')::text as s from (
          select to_jsonb(j) as t from jobs j
          union all select to_jsonb(a) from job_attempts a
          union all select to_jsonb(o) from storage.objects o) x""",
        role=None,
    )
    return str(rows[0]["s"])


def payload(job_id: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "INSERT",
        "table": "jobs",
        "schema": "public",
        "record": {"id": job_id, "status": "pending"},
        "old_record": None,
    }
    body.update(changes)
    return body


# (name, how to send it, expected status, expected error code or outcome)
CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("no body", {"data": b""}, 400, "invalid_json"),
    ("invalid JSON", {"data": b"{not json"}, 400, "invalid_json"),
    ("truncated JSON", {"data": b'{"type": "INSERT", "record": {"id"'}, 400, "invalid_json"),
    ("invalid UTF-8", {"data": b'{"type": "\xff\xfe"}'}, 400, "invalid_json"),
    ("JSON null", {"json": None, "raw_json": b"null"}, 422, "invalid_payload"),
    ("JSON number", {"raw_json": b"42"}, 422, "invalid_payload"),
    ("JSON string", {"raw_json": b'"INSERT"'}, 422, "invalid_payload"),
    ("JSON array", {"raw_json": b"[]"}, 422, "invalid_payload"),
    ("empty object", {"body": {}}, 422, "invalid_payload"),
    ("body over 1 MB", {"data": b"{" + b" " * 1_000_001 + b"}"}, 413, "payload_too_large"),
    ("text/plain", {"body": GOOD, "content_type": "text/plain"}, 415, "unsupported_media_type"),
    (
        "form encoded",
        {"body": GOOD, "content_type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
    (
        "multipart",
        {"body": GOOD, "content_type": "multipart/form-data; boundary=x"},
        415,
        "unsupported_media_type",
    ),
    ("no content type", {"body": GOOD, "content_type": ""}, 415, "unsupported_media_type"),
    ("type missing", {"drop": "type"}, 422, "invalid_payload"),
    ("type DELETE", {"changes": {"type": "DELETE"}}, 422, "invalid_payload"),
    ("type lower case", {"changes": {"type": "insert"}}, 422, "invalid_payload"),
    ("type a number", {"changes": {"type": 1}}, 422, "invalid_payload"),
    ("table missing", {"drop": "table"}, 422, "invalid_payload"),
    ("wrong table", {"changes": {"table": "profiles"}}, 422, "wrong_table"),
    ("schema missing", {"drop": "schema"}, 422, "invalid_payload"),
    ("wrong schema", {"changes": {"schema": "storage"}}, 422, "wrong_table"),
    ("record missing", {"drop": "record"}, 422, "invalid_payload"),
    ("record null", {"changes": {"record": None}}, 422, "invalid_payload"),
    ("record a string", {"changes": {"record": "id"}}, 422, "invalid_payload"),
    ("record id missing", {"changes": {"record": {"status": "pending"}}}, 422, "invalid_payload"),
    ("record id null", {"changes": {"record": {"id": None}}}, 422, "invalid_payload"),
    ("record id a number", {"changes": {"record": {"id": 12345}}}, 422, "invalid_payload"),
    ("record id empty", {"changes": {"record": {"id": ""}}}, 422, "invalid_payload"),
    ("record id not a uuid", {"changes": {"record": {"id": "job-1"}}}, 422, "invalid_payload"),
    ("record id SQL", {"changes": {"record": {"id": "1'; drop table jobs; --"}}}, 422, "invalid_payload"),
    ("record id 10 KB", {"changes": {"record": {"id": "a" * 10_000}}}, 422, "invalid_payload"),
    (
        "update to completed",
        {"changes": {"type": "UPDATE", "record": {"id": "JOB", "status": "completed"}}},
        422,
        "not_claimable",
    ),
    (
        "update to processing",
        {"changes": {"type": "UPDATE", "record": {"id": "JOB", "status": "processing"}}},
        422,
        "not_claimable",
    ),
    ("unknown job id", {"changes": {"record": {"id": str(uuid.UUID(int=99))}}}, 200, "skipped"),
    ("no secret", {"body": GOOD, "secret": None}, 401, "unauthorized"),
    ("empty secret", {"body": GOOD, "secret": ""}, 401, "unauthorized"),
    ("wrong secret", {"body": GOOD, "secret": "not-the-secret"}, 401, "unauthorized"),
    ("secret off by its last character", {"body": GOOD, "secret": SECRET[:-1] + "X"}, 401, "unauthorized"),
    ("secret with an extra first character", {"body": GOOD, "secret": "x" + SECRET}, 401, "unauthorized"),
    (
        "secret in another header",
        {"body": GOOD, "secret": None, "headers": {"Authorization": f"Bearer {SECRET}"}},
        401,
        "unauthorized",
    ),
    ("secret prefix only", {"body": GOOD, "secret": SECRET[:8]}, 401, "unauthorized"),
]
METHODS = ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"]


@pytest.mark.parametrize(("name", "how", "status", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_request_changes_nothing(
    stack: LocalStack, ledger: Ledger, name: str, how: dict[str, Any], status: int, expected: str
) -> None:
    assert stack.relay is not None
    stack.relay.enabled = False
    job_id = str(insert_job(stack.database_url, prompt=f"bad request: {name}"))
    before = snapshot(stack)
    headers = {"Content-Type": how.get("content_type", "application/json"), **how.get("headers", {})}
    secret = how.get("secret", SECRET)
    if secret is not None:
        headers["X-Webhook-Secret"] = secret
    if "data" in how or "raw_json" in how:
        data = how.get("raw_json", how.get("data"))
    else:
        body = how.get("body", GOOD)
        body = payload(job_id, **how.get("changes", {})) if body is GOOD else body
        if isinstance(body, dict):
            body.pop(how.get("drop", ""), None)
            record = body.get("record")
            if isinstance(record, dict) and record.get("id") == "JOB":
                record["id"] = job_id
        data = json.dumps(body).encode()
    if not headers["Content-Type"]:
        del headers["Content-Type"]

    response = requests.post(stack.process_job_url, data=data, headers=headers, timeout=30)

    ledger.responses.append(response.text)
    ledger.bad_inputs.append((f"process_job {name}", f"{response.status_code} {expected}"))
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer.get("error", answer.get("outcome")) == expected
    assert answer.get("message") or answer.get("reason")
    assert snapshot(stack) == before
    # Its webhook was dropped: left pending, a later test's reclaim would run it once it is older
    # than RECLAIM_GRACE_S and book its generation to that test's job.
    sql(stack.database_url, "delete from jobs where id = %s", job_id, role=None)


@pytest.mark.parametrize("method", METHODS)
def test_other_methods_get_405_and_change_nothing(stack: LocalStack, ledger: Ledger, method: str) -> None:
    before = snapshot(stack)
    response = requests.request(
        method, stack.process_job_url, headers={"X-Webhook-Secret": SECRET}, timeout=30
    )
    ledger.bad_inputs.append((f"process_job {method}", f"{response.status_code}"))
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert snapshot(stack) == before


@pytest.mark.parametrize("status", ["completed", "failed", "processing"])
def test_a_delivery_for_a_job_that_is_not_claimable_is_skipped(
    stack: LocalStack, ledger: Ledger, status: str
) -> None:
    assert stack.relay is not None
    stack.relay.enabled = False
    job_id = str(
        insert_job(
            stack.database_url,
            status=status,
            prompt=f"already {status}",
            lease_expires_at="2999-01-01T00:00:00Z" if status == "processing" else None,
        )
    )
    before = snapshot(stack)
    response = requests.post(
        stack.process_job_url, json=payload(job_id), headers={"X-Webhook-Secret": SECRET}, timeout=30
    )
    ledger.bad_inputs.append((f"process_job delivery for a {status} job", response.json()["outcome"]))
    assert (response.status_code, response.json()["outcome"]) == (200, "skipped")
    assert snapshot(stack) == before
    sql(stack.database_url, "delete from jobs where id = %s", job_id, role=None)


RECLAIM_CASES = [
    ("no secret", None, "POST", 401),
    ("wrong secret", "nope", "POST", 401),
    ("PUT", SECRET, "PUT", 405),
    ("DELETE", SECRET, "DELETE", 405),
]


@pytest.mark.parametrize(
    ("name", "secret", "method", "status"), RECLAIM_CASES, ids=[c[0] for c in RECLAIM_CASES]
)
def test_a_bad_request_to_reclaim_changes_nothing(
    stack: LocalStack, ledger: Ledger, name: str, secret: str | None, method: str, status: int
) -> None:
    before = snapshot(stack)
    headers = {"X-Webhook-Secret": secret} if secret is not None else {}
    response = requests.request(method, stack.reclaim_jobs_url, headers=headers, timeout=30)
    ledger.responses.append(response.text)
    ledger.bad_inputs.append((f"reclaim_jobs {name}", str(response.status_code)))
    assert response.status_code == status
    assert response.json()["error"]
    assert snapshot(stack) == before
