"""Issue 35, item 2: the musician reads a message from the documented set, never the provider's own
text, whichever engine failed; the provider's words stay in the attempt's record (job_attempts.error)
where an operator finds them by job id, and the tokens follow what was paid. Each engine's
documented failure answer, from its double, through real processes on the plug-in's database."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from devstack.doubles.replicate_double import Outcome
from devstack.doubles.stable_audio_double import ERRORS, Behaviour
from devstack.stack import LocalStack
from sona.messages import MESSAGES
from tests.plugin.generate import GenerateRequest, generate_over_sql
from tests.plugin.plugin_db import MUSICIAN, balance, plugin_stack, transactions
from tests.support import sql

pytestmark = pytest.mark.slow

# One engine per mode: designer TangoFlux, producer Stable Audio 3, creator Stable Audio 2; the
# earlier worker's text-to-audio keeps Stable Audio 2.5 (STABLE_AUDIO_MODEL's default).
ENV = {
    "DESIGNER_MODEL": "tangoflux",
    "PRODUCER_MODEL": "stable-audio-3",
    "CREATOR_MODEL": "stable-audio-2",
    "GENERATION_POLL_MS": "200",
    "MAX_RETRIES": "0",
}
CUDA = "RuntimeError: CUDA error: an illegal memory access was encountered"
BAD_REQUEST = ERRORS[400][1]  # Stability's 400 body: "prompt: cannot be empty"
MODERATED = ERRORS[403][1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    with plugin_stack(tmp_path_factory.mktemp("messages"), pg_server, ENV, reclaim_function=False) as running:
        yield running


def tangoflux_fails(stack: LocalStack) -> None:
    assert stack.replicate is not None
    stack.replicate.outcomes(
        Outcome("failed", f"Traceback (most recent call last):\n  File 'predict.py'\n{CUDA}")
    )


def stability_answers(status: int) -> Callable[[LocalStack], None]:
    def script(stack: LocalStack) -> None:
        assert stack.double is not None
        stack.double.script(Behaviour("error", status))

    return script


@dataclass(frozen=True)
class Case:
    engine: str
    mode: str
    fault: Callable[[LocalStack], None]
    provider_said: str  # the provider's own words: in the attempt's record, never on the row
    musician_reads: str
    # A refused request cost nothing and is refunded; a prediction that ran and failed was billed
    # by Replicate, so its tokens are kept (supabase/schemas/50_tokens.sql).
    refunded: bool = True


CASES = [
    Case("tangoflux", "designer", tangoflux_fails, CUDA, MESSAGES["could_not_generate"], refunded=False),
    Case("stable-audio-3", "producer", stability_answers(400), BAD_REQUEST, MESSAGES["could_not_generate"]),
    Case("stable-audio-2", "creator", stability_answers(400), BAD_REQUEST, MESSAGES["could_not_generate"]),
    Case(
        "stable-audio-2.5",
        "text-to-audio",
        stability_answers(400),
        BAD_REQUEST,
        MESSAGES["could_not_generate"],
    ),
    Case("stable-audio-3", "producer", stability_answers(403), MODERATED, MESSAGES["moderation"]),
    Case("stable-audio-2.5", "text-to-audio", stability_answers(403), MODERATED, MESSAGES["moderation"]),
]


def start(stack: LocalStack, case: Case) -> tuple[uuid.UUID, int]:
    """The job as its client inserts it, and the tokens it was charged (none for the earlier
    worker's modes, which the plug-in's generate never prices: inserted with the service role)."""
    prompt = f"{case.engine} {case.provider_said[:8]} {uuid.uuid4().hex[:6]}"
    if case.mode == "text-to-audio":
        return stack.insert_as_generate(prompt, 5, "medium", case.mode, user_id=MUSICIAN), 0
    request = GenerateRequest(prompt, duration=5, quality="medium", mode=case.mode)  # type: ignore[arg-type]
    answer = generate_over_sql(stack.database_url, MUSICIAN, request)
    assert answer.status == 201 and answer.job is not None, answer.error
    return uuid.UUID(str(answer.job["id"])), request.cost()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.engine}-{c.musician_reads[:24]}")
def test_the_musician_reads_the_outcomes_message_and_the_operator_finds_the_providers_words(
    stack: LocalStack, case: Case
) -> None:
    before = balance(stack.database_url, MUSICIAN)
    case.fault(stack)
    job_id, charged = start(stack, case)
    row = stack.wait_for(job_id, timeout_s=90)
    assert (row["status"], row["error_message"]) == ("failed", case.musician_reads)
    (attempt,) = sql(
        stack.database_url, "select error from job_attempts where job_id = %s", job_id, role=None
    )
    assert case.provider_said in attempt["error"]
    refunds = [
        t["amount"] for t in transactions(stack.database_url, MUSICIAN) if str(job_id) in t["description"]
    ]
    back = charged if case.refunded else 0
    assert (refunds, balance(stack.database_url, MUSICIAN)) == (
        [back] if back else [],
        before - charged + back,
    )
