"""The Stable Audio 3 client against the loopback double: a POST answers an id (the payment), a GET
answers in-progress, then the audio, then 404 once the id expired; errors map onto the job's kinds."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from typing import Any

import pytest

from devstack.doubles.stable_audio_double import Behaviour, RateLimit, StableAudioDouble
from sona.config import Settings
from sona.deadline import Deadline
from sona.engines.base import GenerationRequest
from sona.engines.stable_audio_3 import StableAudio3Client
from sona.errors import GenerationGone, PermanentError, ServiceOutage, TransientError
from sona.job.modes import plan_job
from sona.models import JobStatus
from sona.rows import Job
from tests.support import make_settings


def job(**fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "prompt": "glass marimba loop",
        "duration": 2,
        "quality": "medium",
        "mode": "designer",
        "status": JobStatus.PROCESSING,
    }
    return Job(**{**values, **fields})


def settings_for(double: StableAudioDouble, **overrides: Any) -> Settings:
    values = {
        "stable_audio_3_api_url": double.v3_url,
        "designer_model": "stable-audio-3",
        "retry_delay_ms": 50,
        "generation_poll_ms": 100,
    }
    return make_settings(**{**values, **overrides})


def client_and_request(
    double: StableAudioDouble, **overrides: Any
) -> tuple[StableAudio3Client, GenerationRequest]:
    settings = settings_for(double, **overrides)
    return StableAudio3Client(settings, sleep=lambda _: None), plan_job(job(), settings).request


def test_a_post_answers_the_generation_id_and_is_the_one_payment(double: StableAudioDouble) -> None:
    client, request = client_and_request(double)
    generation_id = client.submit(request, Deadline(10))
    assert re.fullmatch(r"[0-9a-f]{64}", generation_id)
    (call,) = double.calls
    assert (call.api, call.fields["model"], call.fields["duration"], call.paid) == (
        "v3",
        "stable-audio-3",
        "2",
        True,
    )
    assert call.headers["accept"] == "application/json"


def test_a_get_answers_in_progress_then_the_audio_and_fetching_again_pays_nothing(
    double: StableAudioDouble,
) -> None:
    double.generation_s = 0.3
    client, request = client_and_request(double)
    generation_id = client.submit(request, Deadline(10))
    assert client.fetch(generation_id, "stable-audio-3", Deadline(10)) is None
    double.generation_s = 0
    double.generations[generation_id].ready_at = 0
    audio = client.fetch(generation_id, "stable-audio-3", Deadline(10))
    again = client.fetch(generation_id, "stable-audio-3", Deadline(10))
    assert audio is not None and again is not None
    assert (audio.model, audio.finish_reason, bytes(audio.data[:4])) == ("stable-audio-3", "SUCCESS", b"RIFF")
    assert double.paid_generations == 1


def test_the_json_answer_is_decoded_from_base64(double: StableAudioDouble) -> None:
    client, request = client_and_request(double, stable_audio_accept="application/json")
    audio = client.fetch(client.submit(request, Deadline(10)), "stable-audio-3", Deadline(10))
    assert audio is not None and bytes(audio.data[:4]) == b"RIFF" and audio.seed is not None


@pytest.mark.parametrize("how", ["expired", "unknown"])
def test_an_expired_or_unknown_id_is_gone(double: StableAudioDouble, how: str) -> None:
    client, request = client_and_request(double)
    generation_id = client.submit(request, Deadline(10))
    if how == "expired":
        double.expire(generation_id)
    else:
        generation_id = "f" * 64
    with pytest.raises(GenerationGone):
        client.fetch(generation_id, "stable-audio-3", Deadline(10))


def test_a_fetch_cut_off_mid_body_is_fetched_again(double: StableAudioDouble) -> None:
    client, request = client_and_request(double)
    generation_id = client.submit(request, Deadline(10))
    double.script_fetch(Behaviour("truncate"))
    audio = client.fetch(generation_id, "stable-audio-3", Deadline(10))
    assert audio is not None and double.fetch_count == 2 and double.paid_generations == 1


# (what the double answers the POST, the kind of error, its stable code or None)
POST_ERRORS: list[tuple[str, Behaviour, type[Exception], str | None]] = [
    ("400 bad request", Behaviour("error", 400), PermanentError, None),
    ("403 moderation", Behaviour("error", 403), PermanentError, None),
    ("422 not English", Behaviour("error", 422), PermanentError, None),
    ("500", Behaviour("error", 500), TransientError, None),
    ("401", Behaviour("error", 401), ServiceOutage, "provider_unauthorized"),
    ("402 no credits", Behaviour("error", 402), ServiceOutage, "provider_out_of_credits"),
]


@pytest.mark.parametrize(("name", "answer", "kind", "code"), POST_ERRORS, ids=[c[0] for c in POST_ERRORS])
def test_a_refused_post_is_classified_and_paid_for_by_nothing(
    double: StableAudioDouble, name: str, answer: Behaviour, kind: type[Exception], code: str | None
) -> None:
    client, request = client_and_request(double, max_retries=0)
    double.script(answer)
    with pytest.raises(kind) as raised:
        client.submit(request, Deadline(10))
    assert type(raised.value) is kind
    if code is not None:
        assert getattr(raised.value, "code", None) == code
    assert double.paid_generations == 0


def test_a_key_without_access_pauses_the_service_and_names_the_model_setting(
    double: StableAudioDouble,
) -> None:
    double.sa3_access = False
    client, request = client_and_request(double)
    with pytest.raises(ServiceOutage) as raised:
        client.submit(request, Deadline(10))
    assert raised.value.code == "provider_model_access"
    assert "DESIGNER_MODEL=stable-audio-3" in str(raised.value.detail)
    assert double.paid_generations == 0


def test_the_rate_limit_counts_posts_only(double: StableAudioDouble) -> None:
    double.rate_limit = RateLimit(requests=1, window_s=10, lockout_s=60)
    client, request = client_and_request(double, max_retries=0)
    generation_id = client.submit(request, Deadline(10))
    for _ in range(3):
        assert client.fetch(generation_id, "stable-audio-3", Deadline(10)) is not None
    with pytest.raises(ServiceOutage) as raised:
        client.submit(request, Deadline(10))
    assert raised.value.code == "provider_locked_out"
    assert double.rate_limited == 1


def test_sa3_takes_up_to_380_seconds_and_the_double_refuses_more(double: StableAudioDouble) -> None:
    client, request = client_and_request(double, max_retries=0)
    assert client.submit(replace(request, duration=380), Deadline(10))
    with pytest.raises(PermanentError):
        client.submit(replace(request, duration=381), Deadline(10))
