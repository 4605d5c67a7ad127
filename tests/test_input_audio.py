"""The source audio of an audio-to-audio job: where the row may point, and what the file must be."""

from __future__ import annotations

import uuid

import pytest

from sona.audio.ffmpeg import find_ffmpeg
from sona.audio.input_audio import MAX_BYTES, check_size, input_object, inspect
from sona.errors import PermanentError
from tests.support import wav_bytes

USER = uuid.UUID("0f8e3f44-6a51-4b1e-9a0c-3c2b6d7e8f90")
OTHER = uuid.UUID("a1b2c3d4-0000-4000-8000-000000000001")
BUCKET = "audio-inputs"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"{USER}/take.wav", f"{USER}/take.wav"),
        (f"{USER}/sessions/2026/take 2.mp3", f"{USER}/sessions/2026/take 2.mp3"),
        (f"{BUCKET}/{USER}/take.wav", f"{USER}/take.wav"),  # the upload's fullPath form
    ],
)
def test_a_file_in_the_owners_folder_is_accepted(path: str, expected: str) -> None:
    assert input_object(path, USER, BUCKET) == expected


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (None, "needs an input file"),
        ("  ", "needs an input file"),
        (f"{OTHER}/take.wav", "in another user's folder"),
        (f"{USER}/../{OTHER}/take.wav", "path is not valid"),
        (f"{USER}/./take.wav", "path is not valid"),
        (f"/{USER}/take.wav", "path is not valid"),
        (f"{USER}//take.wav", "path is not valid"),
        ("audio-files/generated/x.wav", "outside the inputs bucket"),
        (f"other-bucket/{USER}/take.wav", "outside the inputs bucket"),
        (f"{USER}", "names a folder, not a file"),
        (f"{USER}/tåke.wav", "path is not valid"),
    ],
)
def test_anything_else_is_refused_with_a_reason_the_musician_can_act_on(
    path: str | None, message: str
) -> None:
    with pytest.raises(PermanentError, match=message):
        input_object(path, USER, BUCKET)


def test_a_wav_of_six_to_190_seconds_is_measured() -> None:
    checked = inspect(wav_bytes(6.5), find_ffmpeg())
    assert (checked.format, round(checked.seconds, 2), checked.content_type) == ("wav", 6.5, "audio/wav")


def test_an_mp3_is_recognised_by_its_bytes_and_measured() -> None:
    from sona.audio.master import encode_mp3

    mp3 = encode_mp3(wav_bytes(8), "128k", find_ffmpeg())
    checked = inspect(mp3, find_ffmpeg())
    assert checked.format == "mp3"
    assert checked.seconds == pytest.approx(8, abs=0.1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (wav_bytes(3), "is 3.0 s long; it must be 6 to 190 seconds"),
        (wav_bytes(190.5, rate=8000, channels=1), "is 190.5 s long"),
        (b"%PDF-1.7 a document, not audio" * 50, "is not MP3 or WAV audio"),
        (b"RIFF\x00\x00\x00\x00WAVE" + b"\x00" * 64, "is not MP3 or WAV audio"),
        (b"fLaC" + b"\x00" * 200, "is not MP3 or WAV audio"),
    ],
)
def test_an_input_the_provider_would_refuse_fails_here(data: bytes, message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        inspect(data, find_ffmpeg())


def test_the_size_limit_leaves_room_in_the_providers_50_mb_request() -> None:
    check_size(MAX_BYTES)
    with pytest.raises(PermanentError, match=r"the limit is 49\.9 MB"):
        check_size(MAX_BYTES + 1)
