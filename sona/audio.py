"""Audio: read what the provider returned, trim its overshoot, keep a WAV master, encode an MP3 preview.

pydub does the sample work; ffmpeg (found once per instance) decodes MP3 and encodes the preview
through pipes, so no temporary files are written.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import warnings
import wave
from dataclasses import dataclass
from functools import cache
from pathlib import Path

with warnings.catch_warnings():
    # pydub warns at import when ffmpeg is not on PATH; we find and pass ffmpeg ourselves.
    warnings.simplefilter("ignore", RuntimeWarning)
    from pydub import AudioSegment as AudioSegment
    from pydub.utils import audioop  # the stdlib module, or audioop-lts on Python 3.13+

from sona.errors import PermanentError

FADE_MS = 30  # a short fade at a trimmed end, so the cut does not click
_UNREADABLE = "The audio service returned audio that could not be read"


class FfmpegMissing(RuntimeError):
    """No ffmpeg anywhere: a startup error, so no job is claimed and then lost mid-way."""


@cache
def find_ffmpeg(configured: str | None = None) -> str:
    """FFMPEG_BINARY, then PATH, then the binary the imageio-ffmpeg wheel ships."""
    candidates = [configured or os.environ.get("FFMPEG_BINARY"), shutil.which("ffmpeg")]
    for candidate in candidates:
        if candidate and shutil.which(candidate):
            return str(shutil.which(candidate))
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        pass
    raise FfmpegMissing(
        "ffmpeg was not found: set FFMPEG_BINARY, put ffmpeg on PATH, or "
        "pip install imageio-ffmpeg (the Cloud Functions image ships ffmpeg)"
    )


@dataclass(frozen=True)
class Master:
    """The WAV master as stored, and what it really is."""

    wav: bytes
    duration_s: float
    sample_rate: int
    channels: int
    sample_width: int
    provider_duration_s: float
    trimmed: bool


def make_master(data: bytes, requested_s: float, ffmpeg: str) -> Master:
    """Decode the provider's audio and cut it to exactly the requested duration."""
    segment = decode(data, ffmpeg)
    width = _declared_width(data) or segment.sample_width  # pydub holds 24-bit as 32-bit
    rate, channels = segment.frame_rate, segment.channels
    provider_s = segment.frame_count() / rate
    requested_frames = round(requested_s * rate)
    if segment.frame_count() <= requested_frames and data[:4] == b"RIFF":
        # Nothing to cut: the provider's own bytes are the master (rate, width, channels kept).
        return Master(data, provider_s, rate, channels, width, provider_s, trimmed=False)
    trimmed = segment.frame_count() > requested_frames
    if trimmed:
        segment = segment.get_sample_slice(0, requested_frames).fade_out(FADE_MS)
    wav = to_wav(segment, width)
    return Master(wav, segment.frame_count() / rate, rate, channels, width, provider_s, trimmed)


def decode(data: bytes, ffmpeg: str) -> AudioSegment:
    """WAV natively; anything else (MP3) through ffmpeg. Raises PermanentError if it is not audio."""
    if not data:
        raise PermanentError("The audio service returned no audio", detail="empty body")
    try:
        if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
            segment = _read_wav(data)
        else:
            segment = _read_wav(_ffmpeg(ffmpeg, ["-i", "pipe:0", "-f", "wav", "pipe:1"], data), streamed=True)
    except (wave.Error, EOFError, ValueError, subprocess.CalledProcessError) as exc:
        raise PermanentError(_UNREADABLE, detail=type(exc).__name__) from None
    if segment.frame_count() < 1 or segment.frame_rate <= 0:
        raise PermanentError(_UNREADABLE, detail="no samples")
    return segment


def _read_wav(data: bytes, *, streamed: bool = False) -> AudioSegment:
    """A WAV from a file checks its declared length; one streamed by ffmpeg has no length yet."""
    with wave.open(io.BytesIO(data)) as reader:
        frames = reader.getnframes()
        channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
        raw = _data_chunk(data) if streamed else reader.readframes(frames)
    if not streamed and len(raw) < frames * channels * width:
        raise ValueError("truncated WAV")
    raw = raw[: len(raw) - len(raw) % (channels * width)]
    return AudioSegment(data=raw, sample_width=width, frame_rate=rate, channels=channels)


def _data_chunk(data: bytes) -> bytes:
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = (
            data[offset : offset + 4],
            int.from_bytes(data[offset + 4 : offset + 8], "little"),
        )
        if chunk_id == b"data":
            return data[offset + 8 :]
        offset += 8 + size + (size & 1)
    raise ValueError("no data chunk")


def to_wav(segment: AudioSegment, width: int | None = None) -> bytes:
    """A PCM WAV at the given sample width (the provider's, so a 24-bit master stays 24-bit)."""
    width = width or segment.sample_width
    raw = segment.raw_data
    if width != segment.sample_width:
        raw = audioop.lin2lin(raw, segment.sample_width, width)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(segment.channels)
        writer.setsampwidth(width)
        writer.setframerate(segment.frame_rate)
        writer.writeframes(raw)
    return out.getvalue()


def _declared_width(data: bytes) -> int | None:
    if data[:4] != b"RIFF":
        return None
    with wave.open(io.BytesIO(data)) as reader:
        return int(reader.getsampwidth())


def encode_mp3(wav: bytes, bitrate: str, ffmpeg: str) -> bytes:
    """The MP3 preview at a constant bitrate. WAV goes in through a pipe; the MP3 goes to a file in
    memory-backed temp space, because only a seekable output gets the LAME header that tells players
    the encoder's padding (through a pipe, the preview decodes about 20 ms too long)."""
    with tempfile.TemporaryDirectory(dir=_memory_tmp()) as tmp:
        out = Path(tmp) / "preview.mp3"
        _ffmpeg(
            ffmpeg,
            [
                "-f",
                "wav",
                "-i",
                "pipe:0",
                "-codec:a",
                "libmp3lame",
                "-b:a",
                bitrate,
                "-f",
                "mp3",
                str(out),
            ],
            wav,
            expect_stdout=False,
        )
        return out.read_bytes()


@cache
def _memory_tmp() -> str | None:
    shm = Path("/dev/shm")  # noqa: S108  private TemporaryDirectory inside it
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _ffmpeg(binary: str, args: list[str], stdin: bytes, *, expect_stdout: bool = True) -> bytes:
    result = subprocess.run(
        [binary, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        input=stdin,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0 or (expect_stdout and not result.stdout):
        raise subprocess.CalledProcessError(result.returncode, binary, result.stdout, result.stderr)
    return result.stdout
