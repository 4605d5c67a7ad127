"""The source audio of an audio-to-audio job: where it may be, and what it must be, checked before
anything is paid for. Stable Audio takes an MP3 or WAV of 6 to 190 seconds in a request of at most
50 MB; Storage keeps it in the private inputs bucket, in the job owner's folder."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass

from sona.audio.master import decoded_seconds
from sona.deadline import Deadline
from sona.errors import BadRequest
from sona.store import storage_rules

MIN_SECONDS, MAX_SECONDS = 6.0, 190.0
# The provider takes at most 50 MB a request; the prompt and the other fields need room beside it.
MAX_BYTES = 50_000_000 - 100_000
CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg"}

_NOT_AUDIO = "The input file is not MP3 or WAV audio. Upload an MP3 or WAV file."


@dataclass(frozen=True)
class InputAudio:
    """The checked input: its bytes as stored, its format and how long it plays. A dataclass, not
    a model: validating up to 50 MB would copy it."""

    data: bytes
    format: str
    seconds: float

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def filename(self) -> str:
        return f"input.{self.format}"


def input_object(path: str | None, user_id: uuid.UUID | None, bucket: str) -> str:
    """The object's name inside the inputs bucket, or PermanentError when the row names anything
    but a file in its owner's folder there (another user's folder, `..`, another bucket)."""
    if not path or not path.strip():
        raise BadRequest("Audio-to-audio needs an input file; upload one and try again.")
    if user_id is None:
        raise BadRequest("The job has no owner, so its input file cannot be checked.")
    parts = path.split("/")
    if parts[0] == bucket and len(parts) > 1:  # the upload's `fullPath` form: bucket/user/file
        parts = parts[1:]
    if any(part in ("", ".", "..") for part in parts) or not storage_rules.is_valid_key("/".join(parts)):
        raise BadRequest("The input file's path is not valid.", detail=f"input_path {path!r}")
    if parts[0] != str(user_id):
        where = "another user's folder" if _is_uuid(parts[0]) else "outside the inputs bucket"
        raise BadRequest(
            f"The input file is in {where}; upload it to your own folder.", detail=f"input_path {path!r}"
        )
    if len(parts) < 2:
        raise BadRequest("The input path names a folder, not a file.", detail=f"input_path {path!r}")
    return "/".join(parts)


def check_size(size: int | None, max_bytes: int = MAX_BYTES) -> None:
    if size is not None and size > max_bytes:
        raise BadRequest(
            f"The input file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB.",
            detail=f"{size} bytes",
        )


def inspect(
    data: bytes,
    ffmpeg: str,
    deadline: Deadline | None = None,
    *,
    max_seconds: float = MAX_SECONDS,
    max_bytes: int = MAX_BYTES,
) -> InputAudio:
    """MP3 or WAV (by its bytes, not its name), decodable by ffmpeg as exactly that, 6 to 190 s
    (to 380 s and 100 MB with stable-audio-3: the model's limits are passed in)."""
    check_size(len(data), max_bytes)
    fmt = sniff(data)
    if fmt is None:
        raise BadRequest(_NOT_AUDIO, detail="neither a RIFF/WAVE header nor an MPEG audio frame")
    try:
        seconds = decoded_seconds(data, fmt, ffmpeg, deadline)
    except subprocess.CalledProcessError:
        raise BadRequest(_NOT_AUDIO, detail=f"ffmpeg could not decode it as {fmt}") from None
    if seconds <= 0:
        raise BadRequest(_NOT_AUDIO, detail="no samples")
    if not MIN_SECONDS <= seconds <= max_seconds:
        raise BadRequest(
            f"The input audio is {seconds:.1f} s long; it must be {MIN_SECONDS:.0f} to "
            f"{max_seconds:.0f} seconds.",
            detail=f"{seconds:.3f} s",
        )
    return InputAudio(data, fmt, seconds)


def sniff(data: bytes) -> str | None:
    """'wav', 'mp3' or None, from the first bytes: a RIFF/WAVE header; an ID3 tag or an MPEG audio
    frame sync (11 set bits) for MP3."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
