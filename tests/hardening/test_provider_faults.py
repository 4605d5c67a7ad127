"""Provider faults from the Stable Audio double: each ends as docs/state-machine.md says, with the number of
provider calls asserted, no duplicate paid generation that a client could avoid (and the reason for
any other), and no attempt outliving its deadline."""

from __future__ import annotations

import time
import uuid

import pytest

from devstack.doubles.stable_audio_double import Behaviour
from devstack.stack import LocalStack
from tests.hardening.conftest import (
    FAULTS_PART,
    JOB_BUDGET_S,
    Ledger,
    assert_recorded_in_time,
    check_end,
    observe,
    run_job,
    settle,
)
from tests.support import sql

pytestmark = pytest.mark.xdist_group(FAULTS_PART)  # the suite's second part (conftest.py)

B = Behaviour
RETRY_AFTER_60 = {"retry-after": "60"}
# What the musician reads when the provider refused the request or sent nothing usable (the provider's
# own reason is in job_attempts.error; README "What the musician reads").
MADE_NOTHING = "could not make this sound"

# (name, script, final status, error fragment, provider calls, attempts)
# MAX_RETRIES=2: an attempt makes at most 3 calls; MAX_ATTEMPTS=3.
CASES: list[tuple[str, list[Behaviour], str, str | None, int, int]] = [
    ("400 bad request", [B("error", 400)], "failed", MADE_NOTHING, 1, 1),
    # Account-level refusals are not the job's fault: the service pauses, the job waits without
    # using up its attempt, and (the account fixed) it is the probe that lifts the pause.
    ("401 unauthorized", [B("error", 401)], "completed", None, 2, 1),
    ("402 payment required", [B("error", 402)], "completed", None, 2, 1),
    ("403 moderation (JSON)", [B("error", 403)], "failed", "content moderation", 1, 1),
    ("403 from the CDN (HTML)", [B("html403")], "completed", None, 2, 1),
    ("404 wrong route", [B("error", 404)], "failed", MADE_NOTHING, 1, 1),
    ("413 payload too large", [B("error", 413)], "failed", MADE_NOTHING, 1, 1),
    ("422 not English", [B("error", 422)], "failed", "must be in English", 1, 1),
    ("finish reason CONTENT_FILTERED", [B("filtered")], "failed", "content moderation", 1, 1),
    ("429 once", [B("error", 429)], "completed", None, 2, 1),
    ("429 with Retry-After 0.2", [B("error", 429, headers={"retry-after": "0.2"})], "completed", None, 2, 1),
    ("500 once", [B("error", 500)], "completed", None, 2, 1),
    ("502 once", [B("error", 502)], "completed", None, 2, 1),
    ("503 once", [B("error", 503)], "completed", None, 2, 1),
    ("connection dropped before an answer", [B("drop")], "completed", None, 2, 1),
    ("connection dropped mid-body", [B("truncate")], "completed", None, 2, 1),
    ("slow but inside the deadline", [B("ok", delay_s=1.0)], "completed", None, 1, 1),
    ("answer still trickling in at the deadline", [B("trickle")], "completed", None, 2, 2),
    ("slow first byte past the deadline", [B("ok", delay_s=JOB_BUDGET_S + 2)], "completed", None, 2, 2),
    ("corrupt audio", [B("corrupt")], "failed", MADE_NOTHING, 1, 1),
    ("empty audio", [B("empty")], "failed", MADE_NOTHING, 1, 1),
    ("503 storm", [B("error", 503)] * 20, "failed", "temporary problem (gave up after 3 attempts)", 9, 3),
    # The lockout outlasts two probes: each re-arms the one pause; no attempt is ever used up.
    (
        "429 lockout storm (Retry-After 60)",
        [B("error", 429, headers=RETRY_AFTER_60)] * 3,
        "completed",
        None,
        4,
        1,
    ),
    (
        "429 throttle storm (Retry-After 8)",
        [B("error", 429, headers={"retry-after": "8"})] * 20,
        "failed",
        "temporary problem (gave up after 3 attempts)",
        3,
        3,
    ),
    ("500 then 502 then success", [B("error", 500), B("error", 502)], "completed", None, 3, 1),
]


@pytest.mark.parametrize(
    ("name", "script", "status", "message", "calls", "attempts"), CASES, ids=[c[0] for c in CASES]
)
def test_a_provider_fault_ends_as_designed(
    stack: LocalStack,
    ledger: Ledger,
    name: str,
    script: list[Behaviour],
    status: str,
    message: str | None,
    calls: int,
    attempts: int,
) -> None:
    job_id, row = run_job(stack, f"provider fault {name}", script)
    ledger.faults.append((f"provider: {name}", f"{row['status']} after {ledger.calls[job_id]} calls"))
    check_end(row, status, attempts, message)
    why = PAID_AGAIN.get(name)
    if why is not None:
        ledger.why_paid_again[job_id] = why
    first = 1 if status == "completed" else _paid_failures(name)
    assert ledger.paid[job_id] == first + (why is not None)
    assert ledger.calls[job_id] == calls
    assert_recorded_in_time(stack, job_id)
    assert open_pauses(stack) == 0  # a probe's success lifted any pause the case opened


def open_pauses(stack: LocalStack) -> int:
    return int(
        sql(stack.database_url, "select count(*) as n from sona_pauses where lifted_at is null", role=None)[
            0
        ]["n"]
    )


# The provider charges for a generation it finished, delivered whole or not, and the synchronous API
# cannot send it again: the retry that rescues the job pays a second time.
PAID_AGAIN = {
    "connection dropped mid-body": "connection dropped mid-body after the provider finished",
    "answer still trickling in at the deadline": "still arriving at the deadline after the provider finished",
}


def _paid_failures(name: str) -> int:
    # Audio that came back whole but unusable was a delivered (charged) generation; never twice.
    return 1 if name in ("corrupt audio", "empty audio") else 0


def test_the_penalty_storm_never_sleeps_past_the_deadline(stack: LocalStack, ledger: Ledger) -> None:
    assert stack.double is not None
    stack.double.script(B("error", 429, headers=RETRY_AFTER_60))
    started = time.monotonic()
    job_id = stack.insert_job(f"one penalty {uuid.uuid4().hex[:6]}", duration=1)
    row = observe(stack, job_id)
    ledger.faults.append(("provider: 429 with a 60 s penalty inside one attempt", row["status"]))
    assert row["status"] == "pending"  # released for a later attempt, not waiting 60 s
    assert time.monotonic() - started < JOB_BUDGET_S
    settle(stack, job_id)
