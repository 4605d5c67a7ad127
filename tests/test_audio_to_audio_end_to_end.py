"""Audio-to-audio end to end through real processes: a signed-in user uploads the source audio to
their folder of the private inputs bucket, inserts a job that names it, and gets a master and a
preview of the requested length; an input that cannot be used fails before any provider call."""

from __future__ import annotations

import itertools
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devstack.stack import LocalStack
from sona.job.modes import client_user_id
from tests.support import RELAY_PAUSE_S, decoded_seconds, wav_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    with LocalStack(
        tmp_path_factory.mktemp("a2a"),
        env={"RETRY_DELAY_MS": "50"},
        process_env={"PATH": "/usr/bin:/bin"},
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
        reclaim_function=False,  # no test here calls reclaim_jobs
    ) as s:
        yield s


@pytest.fixture(autouse=True)
def fresh_double(stack: LocalStack) -> None:
    assert stack.double is not None
    stack.double.reset()


def run_a2a(stack: LocalStack, user_id: uuid.UUID, input_path: str, **columns: object) -> dict[str, object]:
    job_id = stack.insert_job(
        "add a warm analog pad",
        duration=5,
        quality="low",
        mode="audio-to-audio",
        user_id=user_id,
        input_path=input_path,
        **columns,  # type: ignore[arg-type]
    )
    return stack.wait_for(job_id, timeout_s=60)


def test_an_uploaded_wav_becomes_a_master_and_preview_of_the_requested_length(stack: LocalStack) -> None:
    user = stack.create_user()
    source = wav_bytes(8)
    path = stack.upload_input(user, "take one.wav", source, "audio/wav")

    row = run_a2a(stack, user, path, strength=0.3)

    assert row["status"] == "completed", row["error_message"]
    assert decoded_seconds(requests.get(str(row["wav_url"]), timeout=10).content, "wav") == 5.0
    assert abs(decoded_seconds(requests.get(str(row["mp3_url"]), timeout=10).content, "mp3") - 5.0) < 0.06
    assert stack.double is not None
    (call,) = stack.double.calls
    assert call.endpoint == "audio-to-audio"
    assert call.files["audio"] == source  # the multipart `audio` part is the uploaded file
    assert (call.fields["strength"], call.fields["model"]) == ("0.3", "stable-audio-2.5")
    assert call.headers["stability-client-user-id"] == client_user_id(user)


def test_the_provider_output_is_derived_from_the_input(stack: LocalStack) -> None:
    user = stack.create_user()
    path = stack.upload_input(user, "tone.wav", wav_bytes(8), "audio/wav")
    kept = run_a2a(stack, user, path, strength=0.01)  # almost all input: its 440 Hz tone survives
    assert kept["status"] == "completed", kept["error_message"]
    master = requests.get(str(kept["wav_url"]), timeout=10).content
    assert _dominant_hz(master) == pytest.approx(440, abs=5)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("other_users_folder", "in another user's folder"),
        ("three_seconds", "is 3.0 s long; it must be 6 to 190 seconds"),
        ("not_audio", "is not MP3 or WAV audio"),
        ("missing", "input file was not found"),
        ("other_bucket", "outside the inputs bucket"),
        ("dot_dot", "path is not valid"),
    ],
)
def test_an_unusable_input_fails_the_job_before_any_provider_call(
    stack: LocalStack, setup: str, message: str
) -> None:
    user = stack.create_user()
    if setup == "other_users_folder":
        someone = stack.create_user()
        path = stack.upload_input(someone, "theirs.wav", wav_bytes(8), "audio/wav")
    elif setup == "three_seconds":
        path = stack.upload_input(user, "short.wav", wav_bytes(3), "audio/wav")
    elif setup == "not_audio":
        path = stack.upload_input(user, "notes.wav", b"these are my lyrics, not audio\n" * 100, "audio/wav")
    elif setup == "missing":
        path = f"{user}/never-uploaded.wav"
    elif setup == "other_bucket":
        path = "audio-files/generated/someone.wav"
    else:
        path = f"{user}/../{uuid.uuid4()}/x.wav"

    row = run_a2a(stack, user, path)

    assert row["status"] == "failed"
    assert message in str(row["error_message"])
    assert row["attempts"] == 1  # permanent: failed at once, not retried
    assert stack.double is not None and stack.double.call_count == 0


def test_text_to_audio_rows_still_complete_beside_the_new_mode(stack: LocalStack) -> None:
    for mode in ("default", "text-to-audio"):
        row = stack.wait_for(
            stack.insert_job("soft rain", duration=2, quality="low", mode=mode), timeout_s=60
        )
        assert row["status"] == "completed", row["error_message"]
    assert stack.double is not None
    assert {c.endpoint for c in stack.double.calls} == {"text-to-audio"}
    assert all("stability-client-user-id" in c.headers for c in stack.double.calls)


def test_demo_with_an_input_runs_audio_to_audio(tmp_path: Path) -> None:
    source = tmp_path / "riff.wav"
    source.write_bytes(wav_bytes(7))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "devstack",
            "demo",
            "make it a string quartet",
            "--duration",
            "4",
            "--input",
            str(source),
            "--strength",
            "0.4",
        ],
        cwd=Path(__file__).resolve().parents[1],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/riff.wav" in result.stdout and "Inserted audio-to-audio job" in result.stdout
    assert '"mode": "audio-to-audio"' in result.stdout
    assert '"status": "completed"' in result.stdout


def _dominant_hz(wav: bytes) -> float:
    """The strongest frequency of the left channel's first second, by zero crossings of a tone."""
    import io
    import wave

    with wave.open(io.BytesIO(wav)) as reader:
        rate, raw = reader.getframerate(), reader.readframes(reader.getframerate())
    left = [int.from_bytes(raw[i : i + 2], "little", signed=True) for i in range(0, len(raw), 4)]
    crossings = sum(1 for a, b in itertools.pairwise(left) if a < 0 <= b)
    return crossings * rate / len(left)
