"""TangoFlux on Replicate (issue 24), through real processes: jobs the plug-in's `generate` inserts,
served by TangoFlux (the producer mode in this suite's stack; the plug-in's own worker used it for
designer), with Replicate's double standing in (devstack/doubles/replicate_double.py). The prediction id
on the row is the payment, as for Stable Audio 3: a SIGKILL during the wait and a Storage failure
after the output arrived each end completed with one prediction made; a prediction that is gone
leads to exactly one new one (counted); an invalid token pauses the service."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from devstack.doubles.replicate_double import Answer, ReplicateDouble
from devstack.stack import LocalStack
from tests.hardening import test_stable_audio_3 as by_id
from tests.hardening.conftest import FAULTS_PART, JOB_BUDGET_S, Ledger, observe
from tests.hardening.test_stable_audio_3 import crash_process_job, storage_error, wait_for_id
from tests.support import sql

pytestmark = pytest.mark.xdist_group(FAULTS_PART)  # the suite's second part (conftest.py)

TANGO = "tangoflux"


@pytest.fixture
def replicate(stack: LocalStack) -> ReplicateDouble:
    assert stack.replicate is not None
    stack.replicate.generation_s = 0.2
    return stack.replicate


def start_job(stack: LocalStack, ledger: Ledger, label: str, duration: int = 4) -> tuple[uuid.UUID, str]:
    """A producer job inserted as the plug-in's generate inserts it (service role, queued)."""
    prompt = f"tango {label} {uuid.uuid4().hex[:6]}"
    job_id = stack.insert_as_generate(prompt, duration, "medium", "producer")
    ledger.models[job_id] = TANGO
    return job_id, prompt


def finish(
    stack: LocalStack, ledger: Ledger, job_id: uuid.UUID, prompt: str, name: str, why: str | None = None
) -> dict[str, Any]:
    return by_id.finish(stack, ledger, job_id, prompt, name, why, model=TANGO)


def test_a_job_from_generate_is_made_by_one_prediction(
    stack: LocalStack, replicate: ReplicateDouble, ledger: Ledger
) -> None:
    job_id, prompt = start_job(stack, ledger, "plain", duration=30)
    row = finish(stack, ledger, job_id, prompt, "a job from generate")
    assert ledger.paid[job_id] == 1
    (made,) = [r for r in replicate.made if r.input["prompt"].startswith(f"{prompt}. ")]
    # The longest TangoFlux makes (a longer row goes to the fallback: tests/plugin/test_length_made.py).
    assert (made.input["duration"], made.input["steps"], made.input["guidance_scale"]) == (30, 100, 3.5)
    assert row["audio"]["duration_s"] == pytest.approx(30, abs=0.05)
    assert row["enhanced_prompt"] == made.input["prompt"] == f"{prompt}. 30 seconds"
    assert row["filename"].endswith("_Sona_TangoFlux")


def test_a_sigkill_during_the_wait_makes_one_prediction(
    stack: LocalStack, replicate: ReplicateDouble, ledger: Ledger
) -> None:
    replicate.generation_s = 2.0
    job_id, prompt = start_job(stack, ledger, "killed while waiting")
    prediction_id = wait_for_id(stack, job_id)
    crash_process_job(stack)
    replicate.generation_s = 0.2
    row = finish(stack, ledger, job_id, prompt, "SIGKILL during the wait")
    assert (ledger.paid[job_id], row["generation_id"]) == (1, prediction_id)


def test_storage_refusing_after_the_output_arrived_makes_one_prediction(
    stack: LocalStack, replicate: ReplicateDouble, ledger: Ledger
) -> None:
    refused = storage_error("403", "Unauthorized", "Invalid Compact JWS")
    stack.gateway.faults.add("storage:upload", status=400, body=refused)
    job_id, prompt = start_job(stack, ledger, "storage refused")
    row = finish(stack, ledger, job_id, prompt, "storage refuses the key after the output arrived")
    assert (ledger.paid[job_id], row["generations_lost"]) == (1, 0)


def test_a_prediction_gone_before_its_output_was_stored_leads_to_exactly_one_new_one(
    stack: LocalStack, replicate: ReplicateDouble, ledger: Ledger
) -> None:
    stack.gateway.faults.add(
        "storage:upload", status=200, body=None, delay_s=JOB_BUDGET_S + 6, delay_only=True
    )
    job_id, prompt = start_job(stack, ledger, "prediction gone")
    prediction_id = wait_for_id(stack, job_id)
    row = observe(stack, job_id)
    assert row["status"] == "queued" and row["generation_id"] == prediction_id
    replicate.delete(prediction_id)  # as after Replicate's hour: nothing of it to fetch
    row = finish(
        stack,
        ledger,
        job_id,
        prompt,
        "the prediction was gone before its output was stored",
        why="the prediction was gone (1 h) before its output was stored",
    )
    assert (ledger.paid[job_id], row["generations_lost"]) == (2, 1)
    assert row["generation_id"] != prediction_id


def test_an_invalid_token_pauses_the_service_and_makes_no_prediction(
    stack: LocalStack, replicate: ReplicateDouble, ledger: Ledger
) -> None:
    made_before = len(replicate.made)
    replicate.script(Answer(401, on="create"))
    job_id, prompt = start_job(stack, ledger, "invalid token")
    stack.wait_until(
        lambda: sql(stack.database_url, "select 1 from sona_pauses where lifted_at is null", role=None),
        JOB_BUDGET_S * 2,
        "a pause to be recorded",
    )
    (pause,) = sql(stack.database_url, "select code from sona_pauses where lifted_at is null", role=None)
    assert pause["code"] == "provider_unauthorized"
    waiting = observe(stack, job_id)
    assert (waiting["status"], waiting["attempts"]) == ("queued", 0)
    assert len(replicate.made) == made_before
    finish(stack, ledger, job_id, prompt, "invalid token: paused, then the probe")
    assert ledger.paid[job_id] == 1
