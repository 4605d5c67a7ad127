"""Issue 35, item 1: the length asked for is the length made. TangoFlux makes at most 30 s; a longer
row is sent, before anything is paid for, to its mode's fallback model (Stable Audio 2.5 by
default), and the row, the prompt sent and the audio all say the length asked for. Where no
configured model makes it, the job fails unpaid with a message that says so, and `generate`'s
charge comes back. Through real processes on the plug-in's database: `generate`'s charge and insert
replayed (tests/plugin/generate.py), Replicate's and Stability's doubles standing in."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from devstack.stack import LocalStack
from tests.plugin.generate import GenerateRequest, generate_over_sql
from tests.plugin.plugin_db import MUSICIAN, balance, plugin_stack, transactions

pytestmark = pytest.mark.slow

# designer: TangoFlux, falling back to Stable Audio 2.5 (the default); producer: TangoFlux, no fallback.
ENV = {
    "DESIGNER_MODEL": "tangoflux",
    "PRODUCER_MODEL": "tangoflux",
    "PRODUCER_FALLBACK_MODEL": "none",
    "GENERATION_POLL_MS": "200",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("length-made")
    with plugin_stack(root, pg_server, ENV, reclaim_function=False) as running:
        yield running


def generate(stack: LocalStack, request: GenerateRequest) -> uuid.UUID:
    answer = generate_over_sql(stack.database_url, MUSICIAN, request)
    assert answer.status == 201 and answer.job is not None, answer.error
    return uuid.UUID(str(answer.job["id"]))


def predictions_for(stack: LocalStack, prompt: str) -> int:
    assert stack.replicate is not None
    return sum(1 for r in stack.replicate.made if r.input["prompt"].startswith(f"{prompt}. "))


def test_a_45_s_designer_job_is_made_45_s_long_by_the_fallback_without_a_prediction(
    stack: LocalStack,
) -> None:
    assert stack.double is not None
    prompt = f"rain on a tin roof {uuid.uuid4().hex[:6]}"
    job_id = generate(stack, GenerateRequest(prompt, duration=45, quality="medium", mode="designer"))
    row = stack.wait_for(job_id, timeout_s=90)
    assert row["status"] == "completed", row["error_message"]
    assert (row["duration"], row["audio"]["model"]) == (45, "stable-audio-2.5")
    assert row["audio"]["duration_s"] == pytest.approx(45, abs=0.05)
    assert row["enhanced_prompt"] == f"{prompt}. 45 seconds"
    (sent,) = [c for c in stack.double.calls if c.fields.get("prompt") == row["enhanced_prompt"]]
    assert (sent.fields["duration"], sent.fields["model"]) == ("45", "stable-audio-2.5")
    assert predictions_for(stack, prompt) == 0
    assert row["filename"].endswith("_StableAudio")


def test_a_30_s_designer_job_stays_on_tangoflux(stack: LocalStack) -> None:
    prompt = f"door creak {uuid.uuid4().hex[:6]}"
    job_id = generate(stack, GenerateRequest(prompt, duration=30, quality="low", mode="designer"))
    row = stack.wait_for(job_id, timeout_s=90)
    assert row["status"] == "completed", row["error_message"]
    assert (row["audio"]["model"], row["enhanced_prompt"]) == ("tangoflux", f"{prompt}. 30 seconds")
    assert row["audio"]["duration_s"] == pytest.approx(30, abs=0.05)
    assert predictions_for(stack, prompt) == 1


def test_a_length_no_configured_model_makes_fails_unpaid_and_gives_the_tokens_back(
    stack: LocalStack,
) -> None:
    assert stack.double is not None
    prompt = f"drum loop {uuid.uuid4().hex[:6]}"
    request = GenerateRequest(prompt, duration=45, quality="medium", mode="producer", bpm=90)
    before = balance(stack.database_url, MUSICIAN)
    job_id = generate(stack, request)
    row = stack.wait_for(job_id, timeout_s=90)
    assert (row["status"], row["error_message"]) == (
        "failed",
        "The duration must be 1 to 30 seconds, not 45.",
    )
    assert predictions_for(stack, prompt) == 0
    assert not [c for c in stack.double.calls if c.fields.get("prompt", "").startswith(prompt)]
    assert balance(stack.database_url, MUSICIAN) == before
    (refund,) = [
        t
        for t in transactions(stack.database_url, MUSICIAN)
        if t["type"] == "refund" and str(job_id) in t["description"]
    ]
    assert refund["amount"] == request.cost()
