"""The faults that cost the synchronous Stable Audio 2.5 a second paid generation, rerun against
Stable Audio 3 (the designer mode here), plus a SIGKILL between the POST and the fetch and a reclaim
during the wait: the generation id on the row is the payment, so each ends with the audio stored
and the generation paid for once. The cases that do pay again are named and counted: an id the
provider no longer knows (the only way to a new POST), and the one window no client can close, a
crash after the POST was accepted and before its answer (the id) reached the row."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour, StableAudioDouble
from devstack.stack import LocalStack
from tests.hardening.conftest import (
    JOB_BUDGET_S,
    Ledger,
    assert_recorded_in_time,
    observe,
    reclaim,
    settle,
)
from tests.support import sql, wait_until

B = Behaviour
SA3 = "stable-audio-3"


@pytest.fixture(autouse=True)
def instant_generations(double: StableAudioDouble) -> Iterator[None]:
    """The suite's other cases expect a generation at once; a case that slows it puts it back."""
    yield
    double.generation_s = 0.0


def storage_error(status: str, error: str, message: str) -> dict[str, str]:
    return {"statusCode": status, "error": error, "message": message}


def start_sa3_job(stack: LocalStack, ledger: Ledger, label: str) -> tuple[uuid.UUID, str]:
    """A designer job (served by stable-audio-3 in this suite), its webhook on its way."""
    prompt = f"sa3 {label} {uuid.uuid4().hex[:6]}"
    job_id = stack.insert_job(prompt, duration=2, mode="designer")
    ledger.models[job_id] = SA3
    return job_id, prompt


def wait_for_id(stack: LocalStack, job_id: uuid.UUID) -> str:
    """The generation id, once the attempt has written it to the row (it then waits for the audio)."""
    found = stack.wait_until(lambda: stack.job(job_id)["generation_id"], JOB_BUDGET_S, "the generation id")
    return str(found)


def wait_for_acceptance(double: StableAudioDouble, prompt: str) -> str:
    """The id of the generation the double accepted for this prompt (its 202 may not have left)."""

    def accepted() -> str | None:
        for call in list(double.calls):
            if call.generation_id and call.fields.get("prompt", "").startswith(f"{prompt}. "):
                return call.generation_id
        return None

    found: str = wait_until(accepted, JOB_BUDGET_S, "the double to accept the POST")  # it reports each
    return found


def crash_process_job(stack: LocalStack) -> None:
    """SIGKILL the whole functions-framework process group, then start a fresh instance."""
    function = stack.functions["process_job"]
    function.kill(signal.SIGKILL)
    stack.start_function("process_job", function.port)


def finish(
    stack: LocalStack,
    ledger: Ledger,
    job_id: uuid.UUID,
    prompt: str,
    name: str,
    why: str | None = None,
    model: str = SA3,
) -> dict[str, Any]:
    """Settle the job, book it, and check the audio is stored and served (by the model named)."""
    row = settle(stack, job_id, prompt)
    ledger.faults.append((f"{model}: {name}", f"{row['status']} after {row['attempts']} attempt(s)"))
    if why is not None:
        ledger.why_paid_again[job_id] = why
    assert row["status"] == "completed", row["error_message"]
    assert row["audio"]["model"] == model
    for url in (row["wav_url"], row["mp3_url"]):
        assert requests.get(url, timeout=10).status_code == 200
    assert_recorded_in_time(stack, job_id)
    return row


# (name, GET results answers, gateway fault or None, attempts) -- the faults that cost 2.5 a second
# payment: each is now fetched again by the id on the row.
CASES: list[tuple[str, list[Behaviour], tuple[str, dict[str, Any]] | None, int]] = [
    ("connection dropped mid-body", [B("truncate")], None, 1),
    ("answer still trickling in at the deadline", [B("trickle")], None, 2),
    (
        "storage refuses the key after the audio arrived",
        [],
        (
            "storage:upload",
            {"status": 400, "body": storage_error("403", "Unauthorized", "Invalid Compact JWS")},
        ),
        1,
    ),
    (
        "storage answers past the deadline",
        [],
        ("storage:upload", {"status": 200, "body": None, "delay_s": JOB_BUDGET_S + 6, "delay_only": True}),
        2,
    ),
    ("results 503 while waiting", [B("error", 503)], None, 1),
]


@pytest.mark.parametrize(("name", "fetches", "fault", "attempts"), CASES, ids=[c[0] for c in CASES])
def test_a_fault_after_the_payment_is_fetched_again_by_id_never_paid_again(
    stack: LocalStack,
    double: StableAudioDouble,
    ledger: Ledger,
    name: str,
    fetches: list[Behaviour],
    fault: tuple[str, dict[str, Any]] | None,
    attempts: int,
) -> None:
    double.script_fetch(*fetches)
    if fault is not None:
        stack.gateway.faults.add(fault[0], **fault[1])
    job_id, prompt = start_sa3_job(stack, ledger, name)
    row = finish(stack, ledger, job_id, prompt, name)
    assert (ledger.paid[job_id], ledger.calls[job_id], row["attempts"]) == (1, 1, attempts)
    assert row["generations_lost"] == 0


def test_a_sigkill_between_the_post_and_the_fetch_pays_once(
    stack: LocalStack, double: StableAudioDouble, ledger: Ledger
) -> None:
    double.generation_s = 2.0
    job_id, prompt = start_sa3_job(stack, ledger, "killed while waiting")
    generation_id = wait_for_id(stack, job_id)
    crash_process_job(stack)
    double.generation_s = 0.0
    row = finish(stack, ledger, job_id, prompt, "SIGKILL between the POST and the fetch")
    assert (ledger.paid[job_id], row["generation_id"]) == (1, generation_id)


def test_a_reclaim_during_the_wait_fetches_the_same_generation(
    stack: LocalStack, double: StableAudioDouble, ledger: Ledger
) -> None:
    double.generation_s = 3.0
    job_id, prompt = start_sa3_job(stack, ledger, "reclaimed while waiting")
    generation_id = wait_for_id(stack, job_id)
    # The lease runs out while the first attempt still waits: reclaim releases and dispatches the job.
    sql(
        stack.database_url,
        "update jobs set lease_expires_at = now() - interval '1 second' where id = %s",
        job_id,
        role=None,
    )
    summary = reclaim(stack)
    assert summary.get("released", 0) + summary.get("dispatched", 0) >= 1, summary
    observe(stack, job_id)
    row = finish(stack, ledger, job_id, prompt, "reclaim during the wait")
    assert (ledger.paid[job_id], row["generation_id"]) == (1, generation_id)
    assert row["attempts"] >= 2


def test_an_expired_id_is_the_only_way_to_a_new_post_and_is_counted(
    stack: LocalStack, double: StableAudioDouble, ledger: Ledger
) -> None:
    """Storage fails past the deadline after the audio arrived, and the id expires before the next
    attempt: that attempt gets 404 generation_not_found, forgets the id (counted) and pays once more."""
    stack.gateway.faults.add(
        "storage:upload", status=200, body=None, delay_s=JOB_BUDGET_S + 6, delay_only=True
    )
    job_id, prompt = start_sa3_job(stack, ledger, "id expired")
    generation_id = wait_for_id(stack, job_id)
    row = observe(stack, job_id)
    assert row["status"] == "pending" and row["generation_id"] == generation_id
    double.expire(generation_id)
    row = finish(
        stack,
        ledger,
        job_id,
        prompt,
        "the id expired before its audio was stored",
        why="the id expired (24 h) before its audio was stored",
    )
    assert (ledger.paid[job_id], row["generations_lost"]) == (2, 1)
    assert row["generation_id"] != generation_id


def test_a_crash_after_the_post_was_accepted_before_its_answer_pays_again_and_is_counted(
    stack: LocalStack, double: StableAudioDouble, ledger: Ledger
) -> None:
    """The one window left: the provider accepted (and charges for) the generation, but the process
    died before the 202 carrying its id arrived, so nothing on the row says it was paid for."""
    double.script(B("ok", after_accept_s=3.0))
    job_id, prompt = start_sa3_job(stack, ledger, "killed before the id arrived")
    wait_for_acceptance(double, prompt)
    crash_process_job(stack)
    assert stack.job(job_id)["generation_id"] is None
    finish(
        stack,
        ledger,
        job_id,
        prompt,
        "SIGKILL after the POST was accepted, before its 202 arrived",
        why="killed after the POST was accepted, before its id reached the row",
    )
    assert ledger.paid[job_id] == 2


def test_a_key_without_stable_audio_3_access_pauses_and_names_the_model_setting(
    stack: LocalStack, double: StableAudioDouble, ledger: Ledger
) -> None:
    double.sa3_access = False
    job_id, prompt = start_sa3_job(stack, ledger, "no access")
    row = observe(stack, job_id)
    pause = sql(stack.database_url, "select code, reason from sona_pauses where lifted_at is null", role=None)
    assert row["status"] in ("pending", "queued") and row["attempts"] == 0
    assert pause[0]["code"] == "provider_model_access"
    assert "DESIGNER_MODEL=stable-audio-3" in pause[0]["reason"]
    double.sa3_access = True  # the operator switched the setting back, or Stability granted access
    finish(stack, ledger, job_id, prompt, "a key without Stable Audio 3 access")
    assert ledger.paid[job_id] == 1
