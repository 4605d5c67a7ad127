"""The Stable Audio client against the loopback double: the request contract, both answer modes,
and what every documented error means for the job."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from devstack.doubles.stable_audio_double import Behaviour, StableAudioDouble
from sona.config import Settings
from sona.deadline import Deadline
from sona.engines.http import USER_AGENT
from sona.engines.stable_audio import StableAudioClient
from sona.errors import DeadlineExceeded, PermanentError, ServiceOutage, TransientError
from sona.job.modes import plan_job
from sona.models import JobStatus
from sona.rows import Job
from tests.support import SECRETS, make_settings


def job(**fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "prompt": "warm analog pad",
        "duration": 2,
        "quality": "medium",
        "mode": "default",
        "status": JobStatus.PROCESSING,
    }
    values.update(fields)
    return Job(**values)


def settings_for(double: StableAudioDouble, **overrides: Any) -> Settings:
    return make_settings(**{"stable_audio_api_url": double.url, "retry_delay_ms": 100, **overrides})


class Sleeps(list[float]):
    """Records the client's backoff sleeps instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def generate(double: StableAudioDouble, budget_s: float = 30, sleep: Any = None, **overrides: Any) -> Any:
    settings = settings_for(double, **overrides)
    client = StableAudioClient(settings, sleep=sleep if sleep is not None else Sleeps())
    return client.generate(plan_job(job(), settings).request, Deadline(budget_s))


# -- the contract ---------------------------------------------------------------------------------


def test_the_request_is_multipart_with_every_field_and_the_real_headers(double: StableAudioDouble) -> None:
    generate(double, stable_audio_cfg_scale=7)
    (call,) = double.calls
    assert call.content_type.startswith("multipart/form-data; boundary=")
    assert call.fields == {
        "prompt": "warm analog pad",
        "duration": "2",
        "model": "stable-audio-2.5",
        "steps": "6",
        "output_format": "wav",
        "cfg_scale": "7.0",
    }
    assert call.headers["authorization"] == f"Bearer {SECRETS['stable_audio_api_key']}"
    assert call.headers["accept"] == "audio/*"
    assert call.headers["user-agent"] == USER_AGENT
    assert call.answered == 200


@pytest.mark.parametrize(
    ("model", "quality", "steps"),
    [
        ("stable-audio-2.5", "low", 4),
        ("stable-audio-2.5", "medium", 6),
        ("stable-audio-2.5", "high", 8),
        ("stable-audio-2", "low", 30),
        ("stable-audio-2", "medium", 50),
        ("stable-audio-2", "high", 100),
    ],
)
def test_steps_follow_quality_within_the_models_range(model: str, quality: str, steps: int) -> None:
    request = plan_job(job(quality=quality), make_settings(stable_audio_model=model)).request
    assert (request.model, request.steps) == (model, steps)


def test_both_accept_modes_decode_to_the_same_audio(double: StableAudioDouble) -> None:
    raw = generate(double)
    base64_json = generate(double, stable_audio_accept="application/json")
    assert double.calls[1].headers["accept"] == "application/json"
    assert raw.data == base64_json.data
    assert raw.data[:4] == b"RIFF"
    assert raw.finish_reason == base64_json.finish_reason == "SUCCESS"


def test_the_double_refuses_what_the_real_api_refuses(double: StableAudioDouble) -> None:
    import requests

    url = f"{double.url}/text-to-audio"
    urlencoded = requests.post(
        url, data={"prompt": "x"}, headers={"authorization": f"Bearer {double.api_key}"}, timeout=5
    )
    no_auth = requests.post(url, files={"prompt": (None, "x")}, timeout=5)
    bad_steps = requests.post(
        url,
        files={"prompt": (None, "x"), "model": (None, "stable-audio-2.5"), "steps": (None, "50")},
        headers={"authorization": f"Bearer {double.api_key}"},
        timeout=5,
    )
    assert (urlencoded.status_code, urlencoded.json()["name"]) == (400, "bad_request")
    assert (no_auth.status_code, no_auth.json()["name"]) == (401, "unauthorized")
    assert bad_steps.status_code == 400
    assert "steps" in bad_steps.json()["errors"][0]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "ambient"}, "'ambient' mode is not supported; choose designer, producer or creator"),
        ({"mode": "audio-to-audio"}, "needs an input file"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * 10_001}, "limit is 10000"),
        ({"duration": 181}, "1 to 180 seconds"),
        ({"quality": "ultra"}, "quality 'ultra' is unknown"),
    ],
)
def test_bad_rows_fail_before_any_call(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        plan_job(job(**fields), make_settings())


@pytest.mark.parametrize("mode", ["default", "text-to-audio"])
def test_default_and_text_to_audio_modes_are_text_to_audio(mode: str) -> None:
    assert plan_job(job(mode=mode), make_settings()).request.prompt == "warm analog pad"


# -- errors ---------------------------------------------------------------------------------------

PERMANENT = [
    (Behaviour("error", 400), "rejected the request"),
    (Behaviour("error", 403), "content moderation"),
    (Behaviour("filtered"), "content moderation"),
    (Behaviour("error", 413), "too large"),
    (Behaviour("error", 422), "must be in English"),
]


@pytest.mark.parametrize(
    ("behaviour", "message"), PERMANENT, ids=[f"{b.kind}-{b.status}" for b, _ in PERMANENT]
)
def test_a_permanent_error_fails_after_exactly_one_call(
    double: StableAudioDouble, behaviour: Behaviour, message: str
) -> None:
    double.script(behaviour)
    with pytest.raises(PermanentError, match=message) as caught:
        generate(double)
    assert double.call_count == 1
    assert SECRETS["stable_audio_api_key"] not in str(caught.value)


def test_an_html_403_from_the_edge_is_an_outage_not_the_prompts_fault(double: StableAudioDouble) -> None:
    double.script(Behaviour("html403"))
    with pytest.raises(ServiceOutage, match="refused the request; this is not a problem with your prompt"):
        generate(double)
    assert double.call_count == 1  # not retried at once: the job is released for a later attempt


ACCOUNT_LEVEL = [
    (Behaviour("error", 401), "provider_unauthorized"),
    (Behaviour("error", 402), "provider_out_of_credits"),
    (Behaviour("html403"), "provider_edge_refused"),
    (Behaviour("error", 429), "provider_locked_out"),
    (Behaviour("error", 429, headers={"retry-after": "60"}), "provider_locked_out"),
]


@pytest.mark.parametrize(
    ("behaviour", "code"), ACCOUNT_LEVEL, ids=[f"{b.kind}-{b.status}-{c}" for b, c in ACCOUNT_LEVEL]
)
def test_an_account_level_refusal_is_an_outage_tried_once_that_blames_the_service(
    double: StableAudioDouble, behaviour: Behaviour, code: str
) -> None:
    double.script(behaviour)
    with pytest.raises(ServiceOutage, match="not a problem with your prompt") as caught:
        generate(double)
    assert (caught.value.code, double.call_count) == (code, 1)


def test_a_lockout_pauses_for_stabilitys_60_s_unless_it_says_otherwise(double: StableAudioDouble) -> None:
    double.script(Behaviour("error", 429), Behaviour("error", 429, headers={"retry-after": "90"}))
    waits = []
    for _ in range(2):
        with pytest.raises(ServiceOutage) as caught:
            generate(double)
        waits.append(caught.value.retry_after_s)
    assert waits == [60.0, 90.0]


TRANSIENT = [
    Behaviour("error", 429, headers={"retry-after": "0.01"}),
    Behaviour("error", 500),
    Behaviour("error", 502),
    Behaviour("error", 503),
    Behaviour("drop"),
    Behaviour("truncate"),
]


@pytest.mark.parametrize("behaviour", TRANSIENT, ids=[f"{b.kind}-{b.status}" for b in TRANSIENT])
def test_a_transient_error_is_retried_then_succeeds(double: StableAudioDouble, behaviour: Behaviour) -> None:
    double.script(behaviour, behaviour)
    result = generate(double)
    assert double.call_count == 3
    assert result.data[:4] == b"RIFF"


def test_retries_stop_at_max_retries_with_growing_delays(double: StableAudioDouble) -> None:
    double.script(*[Behaviour("error", 503)] * 10)
    sleeps = Sleeps()
    with pytest.raises(TransientError):
        generate(double, sleep=sleeps, max_retries=3)
    assert double.call_count == 4
    # equal jitter from RETRY_DELAY_MS=100: 50..100, 100..200, 200..400 ms
    assert [
        lo <= s <= hi for s, (lo, hi) in zip(sleeps, [(0.05, 0.1), (0.1, 0.2), (0.2, 0.4)], strict=True)
    ] == [True] * 3


def test_retry_after_is_honoured(double: StableAudioDouble) -> None:
    double.script(Behaviour("error", 429, headers={"retry-after": "0.25"}))
    sleeps = Sleeps()
    generate(double, sleep=sleeps)
    assert sleeps == [0.25]


def test_retries_stop_at_the_deadline_before_max_retries(double: StableAudioDouble) -> None:
    double.script(*[Behaviour("error", 503)] * 20)
    started = time.monotonic()
    with pytest.raises(TransientError):
        generate(double, budget_s=2.5, sleep=time.sleep, max_retries=10, retry_delay_ms=400)
    assert 2 <= double.call_count < 11
    assert time.monotonic() - started < 2.5


def test_a_429_penalty_longer_than_the_deadline_is_not_waited_out(double: StableAudioDouble) -> None:
    double.script(Behaviour("error", 429, headers={"retry-after": "8"}))
    sleeps = Sleeps()
    with pytest.raises(TransientError, match="busy"):
        generate(double, budget_s=5, sleep=sleeps)
    assert (double.call_count, sleeps) == (1, [])


def test_an_answer_still_trickling_in_at_the_deadline_is_cut_off_there(double: StableAudioDouble) -> None:
    double.script(Behaviour("trickle"))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        generate(double, budget_s=1.5)
    assert time.monotonic() - started < 2.5  # the whole answer would take about 18 s
    assert double.call_count == 1


def test_a_generation_cut_off_mid_body_was_still_paid_for(double: StableAudioDouble) -> None:
    double.script(Behaviour("truncate"))
    generate(double)
    assert [(c.answered, c.paid) for c in double.calls] == [(200, True), (200, True)]
    assert double.paid_generations == 2


def test_a_slow_first_byte_past_the_deadline_is_a_timeout(double: StableAudioDouble) -> None:
    double.script(Behaviour("ok", delay_s=2.0))
    started = time.monotonic()
    with pytest.raises(TransientError):
        generate(double, budget_s=1.2)
    assert time.monotonic() - started < 1.9


@pytest.mark.parametrize(
    ("prompt", "sent"),
    [
        ("rain\x07 on\x1b[31m glass\x00", "rain  on [31m glass"),
        ("🌲 forest 🌅", "🌲 forest 🌅"),
        ("  tabs\tand\nnewlines  ", "tabs and newlines"),
        ("forêt à l'aube", "forêt à l'aube"),
    ],
)
def test_control_characters_become_spaces_and_everything_printable_stays(prompt: str, sent: str) -> None:
    assert plan_job(job(prompt=prompt), make_settings()).request.prompt == sent
