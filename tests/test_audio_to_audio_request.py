"""Audio-to-audio at the provider's boundary: what the row must hold, what the client sends, and the
double's own 400s for an input the provider refuses (missing, too short or long, not MP3/WAV)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from devstack.doubles.stable_audio_double import StableAudioDouble
from sona.audio.input_audio import inspect
from sona.deadline import Deadline
from sona.engines.stable_audio import StableAudioClient
from sona.errors import PermanentError
from sona.job.modes import DEFAULT_STRENGTH, client_user_id, plan_job
from sona.models import JobStatus
from sona.rows import Job
from tests.support import make_settings, wav_bytes

USER = uuid.UUID("7d5cf1f0-3f0e-4d8a-9a47-0c7f3e1b2a10")


def a2a_job(**fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "user_id": USER,
        "prompt": "make it a string quartet",
        "duration": 5,
        "quality": "low",
        "mode": "audio-to-audio",
        "input_path": f"{USER}/take.wav",
        "status": JobStatus.PROCESSING,
    }
    return Job(**{**values, **fields})


@pytest.mark.parametrize(
    ("fields", "model", "message"),
    [
        ({"strength": 0.005}, "stable-audio-2.5", "strength must be 0.01 to 1 with stable-audio-2.5"),
        ({"strength": 1.5}, "stable-audio-2", "strength must be 0 to 1 with stable-audio-2"),
        ({"input_path": None}, "stable-audio-2.5", "needs an input file"),
        ({"user_id": None}, "stable-audio-2.5", "has no owner"),
    ],
)
def test_a_row_the_provider_would_refuse_fails_before_any_call(
    fields: dict[str, Any], model: str, message: str
) -> None:
    with pytest.raises(PermanentError, match=message):
        plan_job(a2a_job(**fields), make_settings(stable_audio_model=model))


def test_the_strength_defaults_to_half_way_because_the_apis_default_ignores_the_input() -> None:
    request = plan_job(a2a_job(), make_settings()).request
    assert (request.kind, request.strength, request.input_object) == (
        "audio-to-audio",
        DEFAULT_STRENGTH,
        f"{USER}/take.wav",
    )


def test_the_client_sends_the_audio_part_strength_model_and_a_hashed_user(double: StableAudioDouble) -> None:
    settings = make_settings(stable_audio_api_url=double.url, retry_delay_ms=10)
    source = inspect(wav_bytes(7), _ffmpeg())
    request = plan_job(a2a_job(strength=0.25), settings).request.with_source(source)

    generated = StableAudioClient(settings).generate(request, Deadline(30))

    (call,) = double.calls
    assert call.endpoint == "audio-to-audio"
    assert call.files["audio"] == source.data
    assert {k: call.fields[k] for k in ("strength", "model", "duration")} == {
        "strength": "0.25",
        "model": "stable-audio-2.5",
        "duration": "5",
    }
    assert call.headers["stability-client-user-id"] == client_user_id(USER)
    assert str(USER) not in call.headers["stability-client-user-id"]
    assert generated.data[:4] == b"RIFF"


def test_an_audio_to_audio_request_without_its_read_input_is_never_sent(double: StableAudioDouble) -> None:
    settings = make_settings(stable_audio_api_url=double.url)
    with pytest.raises(PermanentError, match="input audio was not read"):
        StableAudioClient(settings).generate(plan_job(a2a_job(), settings).request, Deadline(30))
    assert double.call_count == 0


@pytest.mark.parametrize(
    ("audio", "error"),
    [
        (None, "audio: is required"),
        (wav_bytes(3), "audio: duration must be between 6 and 190 seconds"),
        (wav_bytes(191, rate=8000, channels=1), "audio: duration must be between 6 and 190 seconds"),
        (b"not audio at all" * 64, "audio: must be a valid MP3 or WAV file"),
    ],
)
def test_the_double_answers_the_providers_400_for_an_unusable_input(
    double: StableAudioDouble, audio: bytes | None, error: str
) -> None:
    files: dict[str, Any] = {
        "prompt": (None, "x"),
        "model": (None, "stable-audio-2.5"),
        "duration": (None, "5"),
    }
    if audio is not None:
        files["audio"] = ("input.wav", audio, "audio/wav")
    response = requests.post(
        f"{double.url}/audio-to-audio",
        files=files,
        headers={"authorization": f"Bearer {double.api_key}"},
        timeout=30,
    )
    assert response.status_code == 400
    body = response.json()
    assert body["name"] == "bad_request" and set(body) == {"id", "name", "errors"}
    assert body["errors"][0].startswith(error)
    assert double.paid_generations == 0


def _ffmpeg() -> str:
    from sona.audio.ffmpeg import find_ffmpeg

    return find_ffmpeg()
