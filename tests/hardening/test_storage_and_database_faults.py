"""Storage and database faults from the local gateway: no job is lost, nothing is paid twice, and
a row the function could not claim is left exactly as it was."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour
from devstack.emulators.gateway import gateway_error, gateway_error_page
from devstack.stack import LocalStack
from sona.models import webhook_payload
from tests.hardening.conftest import (
    FAULTS_PART,
    JOB_BUDGET_S,
    Ledger,
    assert_recorded_in_time,
    check_end,
    reclaim,
    run_job,
    settle,
)

pytestmark = pytest.mark.xdist_group(FAULTS_PART)  # the suite's second part (conftest.py)

DB_DOWN = {
    "code": "PGRST000",
    "details": "connection refused",
    "hint": None,
    "message": "Could not connect with the database",
}
DB_INTERNAL = {"code": "XX000", "details": None, "hint": None, "message": "internal error"}


def storage_error(status: str, error: str, message: str) -> dict[str, str]:
    return {"statusCode": status, "error": error, "message": message}


# (name, route, fault arguments, provider script, final status, error fragment, calls, attempts)
CASES: list[tuple[str, str, dict[str, Any], list[Behaviour], str, str | None, int, int]] = [
    (
        "storage 5xx on the first upload",
        "storage:upload",
        {"status": 503, "body": storage_error("503", "Service Unavailable", "try later")},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "storage answer lost after the upload landed",
        "storage:upload",
        {"status": 502, "body": storage_error("502", "Bad Gateway", "upstream"), "after": True},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "storage Duplicate after the upload landed",
        "storage:upload",
        {
            "status": 400,
            "body": storage_error("409", "Duplicate", "The resource already exists"),
            "after": True,
        },
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "storage connection dropped",
        "storage:upload",
        {"status": 0, "body": None},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "storage payload too large",
        "storage:upload",
        {
            "status": 400,
            "body": storage_error("413", "Payload too large", "The object exceeded the maximum allowed size"),
        },
        [],
        "failed",
        "could not be stored",
        1,
        1,
    ),
    (
        # A rotated or wrong key: the service pauses; once fixed, the probe completes the job.
        "storage refuses the key",
        "storage:upload",
        {"status": 400, "body": storage_error("403", "Unauthorized", "Invalid Compact JWS")},
        [],
        "completed",
        None,
        2,
        1,
    ),
    (
        "slow storage",
        "storage:upload",
        {"status": 200, "body": None, "delay_s": 1.0, "delay_only": True},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "storage slower than the job's deadline",
        "storage:upload",
        {"status": 200, "body": None, "delay_s": JOB_BUDGET_S + 6, "delay_only": True},
        [],
        "completed",
        None,
        2,
        2,
    ),
    (
        "database down during claim",
        "rpc:claim_job",
        {"status": 503, "body": DB_DOWN},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "database internal error during claim",
        "rpc:claim_job",
        {"status": 500, "body": DB_INTERNAL},
        [],
        "completed",
        None,
        1,
        1,
    ),
    ("gateway drops the claim", "rpc:claim_job", {"status": 0, "body": None}, [], "completed", None, 1, 1),
    (
        "gateway's own 502 during claim",
        "rpc:claim_job",
        {**gateway_error(502), "times": 3},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "gateway HTML page during claim",
        "rpc:claim_job",
        {**gateway_error_page(503), "times": 3},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "claim landed but its answer was lost",
        "rpc:claim_job",
        {**gateway_error(502), "after": True},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "gateway's own 504 during complete",
        "rpc:complete_job",
        {**gateway_error(504), "times": 3},
        [],
        "completed",
        None,
        1,
        2,
    ),
    (
        "database down during complete",
        "rpc:complete_job",
        {"status": 503, "body": DB_DOWN, "times": 3},
        [],
        "completed",
        None,
        1,
        2,
    ),
    (
        "database blip during complete",
        "rpc:complete_job",
        {"status": 503, "body": DB_DOWN, "times": 1},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "complete landed but its answer was lost",
        "rpc:complete_job",
        {"status": 503, "body": DB_DOWN, "after": True},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "slow database during complete",
        "rpc:complete_job",
        {"status": 200, "body": None, "delay_s": 1.0, "delay_only": True},
        [],
        "completed",
        None,
        1,
        1,
    ),
    (
        "database down while recording a failure",
        "rpc:fail_job",
        {"status": 503, "body": DB_DOWN, "times": 3},
        [Behaviour("error", 403), Behaviour("error", 403)],
        "failed",
        "content moderation",
        2,
        2,
    ),
]


# The first attempt paid, then Storage answered only after the deadline: nothing complete was stored
# (the WAV lands late, the MP3 never went), so the retry that rescues the job pays again.
PAID_AGAIN = {
    "storage slower than the job's deadline": "storage answered past the deadline, nothing stored yet",
    # Storage refused the key only once the audio was paid for (the bucket check is per instance).
    "storage refuses the key": "storage refused the key after the provider finished",
}


@pytest.mark.parametrize(
    ("name", "route", "fault", "script", "status", "message", "calls", "attempts"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_a_storage_or_database_fault_loses_nothing_and_pays_once(
    stack: LocalStack,
    ledger: Ledger,
    name: str,
    route: str,
    fault: dict[str, Any],
    script: list[Behaviour],
    status: str,
    message: str | None,
    calls: int,
    attempts: int,
) -> None:
    stack.gateway.faults.add(route, **fault)
    job_id, row = run_job(stack, f"gateway fault {name}", script)
    ledger.faults.append((f"gateway: {name}", f"{row['status']} after {row['attempts']} attempt(s)"))
    check_end(row, status, attempts, message)
    assert ledger.calls[job_id] == calls
    assert_recorded_in_time(stack, job_id)
    why = PAID_AGAIN.get(name)
    if why is not None:
        ledger.why_paid_again[job_id] = why
    assert ledger.paid[job_id] <= (1 if why is None else 2)
    if status == "completed":
        for url in (row["wav_url"], row["mp3_url"]):
            assert requests.get(url, timeout=10).status_code == 200


def test_a_claim_that_cannot_reach_the_database_leaves_the_row_untouched(
    stack: LocalStack, ledger: Ledger
) -> None:
    assert stack.relay is not None
    stack.relay.enabled = False
    job_id = stack.insert_job(f"untouched {uuid.uuid4().hex[:6]}", duration=1)
    before = stack.job(job_id)
    stack.gateway.faults.down.add("rpc:claim_job")
    response = requests.post(
        stack.process_job_url,
        headers={"X-Webhook-Secret": stack.webhook_secret},
        json=webhook_payload(job_id),
        timeout=30,
    )
    ledger.responses.append(response.text)
    ledger.faults.append(("gateway: database down, direct delivery", str(response.status_code)))
    assert response.status_code == 503
    assert stack.job(job_id) == before
    stack.gateway.faults.clear()
    assert settle(stack, job_id)["status"] == "completed"


def test_reclaim_with_the_database_down_changes_nothing(stack: LocalStack, ledger: Ledger) -> None:
    assert stack.relay is not None
    stack.relay.enabled = False
    job_id = stack.insert_job(f"reclaim down {uuid.uuid4().hex[:6]}", duration=1)
    stack.gateway.faults.down.add("*")
    summary = requests.post(
        stack.reclaim_jobs_url, headers={"X-Webhook-Secret": stack.webhook_secret}, timeout=30
    )
    ledger.faults.append(("gateway: database down during reclaim", str(summary.status_code)))
    assert summary.status_code == 503
    stack.gateway.faults.clear()
    assert stack.job(job_id)["status"] == "pending"
    assert settle(stack, job_id)["status"] == "completed"
    assert reclaim(stack)["dispatched"] == 0
