"""Audio: read what the provider returned, trim its overshoot, keep a WAV master, encode an MP3 preview.

The master is sliced from the provider's bytes without copying the samples more than once; pydub
fades the cut end; ffmpeg (found once per instance) decodes MP3 and encodes the preview.
"""

from __future__ import annotations

import fcntl
import io
import os
import signal
import subprocess
import tempfile
import threading
import time
import warnings
import wave
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, cast

with warnings.catch_warnings():
    # pydub warns at import when ffmpeg is not on PATH; we find and pass ffmpeg ourselves.
    warnings.simplefilter("ignore", RuntimeWarning)
    from pydub import AudioSegment as AudioSegment
    from pydub.utils import audioop as audioop  # the stdlib module, or audioop-lts on Python 3.13+

from sona.audio import loudness, mp3gain
from sona.audio.loudness import Loudness
from sona.deadline import Deadline
from sona.errors import DeadlineExceeded, PermanentError

FADE_MS = 30  # a short fade at a trimmed end, so the cut does not click
# At most one encoder per CPU: jobs that finish generating together (a concurrent instance) would
# otherwise run eight ffmpeg processes on two cores, each then costing nearly twice its CPU.
_ENCODERS = threading.BoundedSemaphore(
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
_UNREADABLE = "The audio service returned audio that could not be read"
_OUT_OF_TIME = "The job ran out of time"
_PIPE_BYTES = 1 << 20  # /proc/sys/fs/pipe-max-size by default


Audio = bytes | bytearray


@dataclass(frozen=True)
class Master:
    """The WAV master as stored, and what it really is."""

    wav: Audio  # the engine's bytearray, cut in place, when the answer was a PCM WAV
    duration_s: float
    sample_rate: int
    channels: int
    sample_width: int
    provider_duration_s: float
    trimmed: bool


@dataclass(frozen=True)
class Pcm:
    """A PCM WAV's format and a zero-copy view of its samples (a 60 s master is 10.6 MB, and the
    function must not hold many copies of it)."""

    rate: int
    channels: int
    width: int
    samples: memoryview

    @property
    def frame_size(self) -> int:
        return self.channels * self.width

    @property
    def frames(self) -> int:
        return len(self.samples) // self.frame_size


def make_master(data: Audio, requested_s: float, ffmpeg: str, deadline: Deadline | None = None) -> Master:
    """Cut the provider's audio to exactly the requested duration, keeping its format. A PCM WAV
    read into a bytearray (as the engines read answers) is cut in place and becomes the master: a
    60 s answer is 10.6 MB, and a second copy of it would be most of what a job holds."""
    native = _is_wav(data)
    pcm = decode(data, ffmpeg, deadline)
    provider_s = pcm.frames / pcm.rate
    keep = round(requested_s * pcm.rate)
    if pcm.frames <= keep and native:
        # Nothing to cut: the provider's own bytes are the master (rate, width, channels kept).
        pcm.samples.release()
        return Master(data, provider_s, pcm.rate, pcm.channels, pcm.width, provider_s, trimmed=False)
    trimmed = pcm.frames > keep
    frames = min(keep, pcm.frames)
    end = frames * pcm.frame_size
    fade = min(frames, pcm.rate * FADE_MS // 1000) * pcm.frame_size if trimmed else 0
    with pcm.samples[end - fade : end] as last:
        tail = fade_out(pcm, last) if fade else b""
    header = wav_header(pcm.rate, pcm.channels, pcm.width, frames)
    if native and isinstance(data, bytearray):
        pcm.samples.release()  # a bytearray cannot be resized while a view of it is held
        wav: Audio = _cut_in_place(data, header, end, tail)
    else:
        # One copy of the samples: header, the untouched body, and the faded tail.
        wav = b"".join((header, pcm.samples[: end - fade], tail))
    return Master(wav, frames / pcm.rate, pcm.rate, pcm.channels, pcm.width, provider_s, trimmed)


def _cut_in_place(data: bytearray, header: bytes, end: int, tail: bytes) -> bytearray:
    """The master made out of the answer's own buffer: the faded tail written over the samples it
    replaces, the overshoot cut off, and the new header laid just before the samples, with any
    chunks the provider put ahead of them dropped (deleting a bytearray's front moves no bytes)."""
    start = _chunk(data, b"data")
    stop = start + end
    data[stop - len(tail) : stop] = tail
    del data[stop:]
    data[start - len(header) : start] = header  # a PCM WAV's samples start at byte 44 or later
    del data[: start - len(header)]
    return data


def fade_out(pcm: Pcm, tail: memoryview) -> bytes:
    """pydub's fade over the last few milliseconds only (it would copy the whole file twice)."""
    segment = AudioSegment(
        data=bytes(tail), sample_width=pcm.width, frame_rate=pcm.rate, channels=pcm.channels
    )
    faded = segment.fade_out(len(segment))
    raw: bytes = faded.raw_data
    if faded.sample_width != pcm.width:  # pydub holds 24-bit samples as 32-bit
        raw = audioop.lin2lin(raw, faded.sample_width, pcm.width)
    return raw


def wav_header(rate: int, channels: int, width: int, frames: int) -> bytes:
    """The 44-byte header of a PCM WAV (what the wave module writes, without copying samples)."""
    size = frames * channels * width
    return b"".join(
        (
            b"RIFF",
            (36 + size).to_bytes(4, "little"),
            b"WAVEfmt ",
            (16).to_bytes(4, "little"),
            (1).to_bytes(2, "little"),
            channels.to_bytes(2, "little"),
            rate.to_bytes(4, "little"),
            (rate * channels * width).to_bytes(4, "little"),
            (channels * width).to_bytes(2, "little"),
            (width * 8).to_bytes(2, "little"),
            b"data",
            size.to_bytes(4, "little"),
        )
    )


def decode(data: Audio, ffmpeg: str, deadline: Deadline | None = None) -> Pcm:
    """PCM WAV natively; anything else (MP3, float WAV) through ffmpeg. Raises PermanentError if
    it is not audio."""
    if not data:
        raise PermanentError("The audio service returned no audio", detail="empty body")
    try:
        try:
            pcm = read_wav(data)
        except (wave.Error, EOFError, ValueError):
            if _is_wav(data) and _declares_pcm(data):
                raise  # a PCM WAV that does not hold what it declares: truncated, not convertible
            wav = _ffmpeg(ffmpeg, ["-i", "pipe:0", "-f", "wav", "pipe:1"], data, deadline=deadline)
            pcm = read_wav(wav, streamed=True)
    except (wave.Error, EOFError, ValueError, subprocess.CalledProcessError) as exc:
        raise PermanentError(_UNREADABLE, detail=type(exc).__name__) from None
    if pcm.frames < 1 or pcm.rate <= 0:
        raise PermanentError(_UNREADABLE, detail="no samples")
    return pcm


def read_wav(data: Audio, *, streamed: bool = False) -> Pcm:
    """A WAV from a file must hold what it declares; one streamed by ffmpeg has no length yet."""
    if not _is_wav(data):
        raise ValueError("not a WAV")
    start = _chunk(data, b"data")
    # The wave module reads only the chunks before the samples: it gets those bytes, not the whole
    # buffer (io.BytesIO would copy a bytearray's 10 MB).
    with wave.open(io.BytesIO(bytes(data[:start]))) as reader:
        frames = reader.getnframes()
        channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
    end = len(data) if streamed else start + frames * channels * width
    if end > len(data):
        raise ValueError("truncated WAV")
    end -= (end - start) % (channels * width)
    return Pcm(rate, channels, width, memoryview(data)[start:end])


def _is_wav(data: Audio) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WAVE"


def _declares_pcm(data: Audio) -> bool:
    try:
        offset = _chunk(data, b"fmt ")
    except ValueError:
        return False
    return int.from_bytes(data[offset : offset + 2], "little") == 1


def _chunk(data: Audio, wanted: bytes) -> int:
    """Where a RIFF chunk's payload starts."""
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = bytes(data[offset : offset + 4])
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        if chunk_id == wanted:
            return offset + 8
        offset += 8 + size + (size & 1)
    raise ValueError(f"no {wanted!r} chunk")


def encode_mp3(wav: Audio, bitrate: str, ffmpeg: str, deadline: Deadline | None = None) -> bytes:
    """The MP3 at a constant bitrate, nothing else measured (the double's MP3 answers use it)."""
    with _encoder(deadline):
        mp3, _ = _encode(ffmpeg, wav, bitrate, deadline)
    return bytes(mp3)


def _encode(
    ffmpeg: str,
    wav: Audio,
    bitrate: str,
    deadline: Deadline | None,
    *,
    filters: tuple[str, ...] = (),
    output: tuple[str, ...] = (),
    loglevel: str = "error",
) -> tuple[bytearray, bytes]:
    """A constant-bitrate MP3 encode (the caller holds an encoder slot): WAV goes in through a pipe;
    the MP3 goes to a file in memory-backed temp space, because only a seekable output gets the LAME
    header that tells players the encoder's padding (through a pipe, the preview decodes about
    20 ms too long). Answers the MP3 and ffmpeg's log."""
    with tempfile.TemporaryDirectory(dir=_memory_tmp()) as tmp:
        out = Path(tmp) / "preview.mp3"
        args = ["-f", "wav", "-i", "pipe:0", *filters, "-codec:a", "libmp3lame", "-b:a", bitrate, *output]
        _, log = _run_ffmpeg(
            ffmpeg,
            [*args, "-f", "mp3", str(out)],
            wav,
            expect_stdout=False,
            deadline=deadline,
            loglevel=loglevel,
        )
        return _read_into_buffer(out), log


def _read_into_buffer(path: Path) -> bytearray:
    """The file in one buffer of its size, which the gain then adjusts in place (read_bytes and a
    bytearray of it would hold the preview three times)."""
    with path.open("rb") as file:  # a buffered readinto reads until the buffer is full
        data = bytearray(os.fstat(file.fileno()).st_size)
        read = file.readinto(data)
    del data[read:]
    return data


@dataclass(frozen=True)
class Preview:
    """The MP3 preview and what was measured of the master while it was encoded."""

    mp3: bytearray
    loudness: Loudness
    gain_db: float  # applied to the preview; 0 when normalisation is off or nothing is needed
    # Its parts (ms): the encoder's run (the loudness on its branch), then the gain on the frames.
    timings_ms: dict[str, int] = field(default_factory=dict)


def encode_preview(
    wav: Audio, bitrate: str, ffmpeg: str, deadline: Deadline | None = None, *, normalize: bool = True
) -> Preview:
    """One ffmpeg run reads the master once: it encodes the MP3 at unity gain and, on a branch of
    the same input, measures the master's loudness (ebur128); the gain that follows from it is then
    applied to the encoded frames losslessly (sona.audio.mp3gain). The master is never altered.

    ffmpeg (7 and later) runs the filtergraph and the encoder on threads of their own, so the branch
    rides beside the encode where a CPU is free; a second ffmpeg run for the loudness was measured
    to cost more CPU (its own read of the master: about 0.12 s more for a 60 s master) for no wall
    time that could be told apart, which concurrent jobs on two CPUs pay for (PERFORMANCE.md)."""
    timings: dict[str, int] = {}
    with _encoder(deadline):  # the run's own time, after the wait for a slot
        started = time.monotonic()
        mp3, measured = _encode_with_loudness(wav, bitrate, ffmpeg, deadline)
        timings["encode_ffmpeg"] = round((time.monotonic() - started) * 1000)
    if not normalize:
        return Preview(mp3, measured, 0.0, timings)
    started = time.monotonic()
    steps = mp3gain.apply_gain_in_place(mp3, mp3gain.steps_for(*loudness.wanted_gain_db(measured)))
    timings["gain"] = round((time.monotonic() - started) * 1000)
    return Preview(mp3, measured, round(steps * mp3gain.STEP_DB, 2), timings)


def _encode_with_loudness(
    wav: Audio, bitrate: str, ffmpeg: str, deadline: Deadline | None
) -> tuple[bytearray, Loudness]:
    """One ffmpeg run: the encode, and on a branch of the same input the loudness."""
    graph = f"[0:a]asplit=2[enc][m];[m]{loudness.FILTER},anullsink"
    mp3, log = _encode(
        ffmpeg,
        wav,
        bitrate,
        deadline,
        filters=("-filter_complex", graph, "-map", "[enc]"),
        output=("-ar", str(_wav_rate(wav))),
        loglevel="info",  # the ebur128 summary is logged at info
    )
    return mp3, loudness.parse_summary(log.decode("utf-8", "replace"))


def _wav_rate(wav: Audio) -> int:
    """The master's rate, pinned on the preview: an ffmpeg whose ebur128 wants 48 kHz (before 7)
    would otherwise resample the encoder's branch too."""
    fmt = _chunk(wav, b"fmt ")
    return int.from_bytes(wav[fmt + 4 : fmt + 8], "little")


@contextmanager
def _encoder(deadline: Deadline | None) -> Iterator[None]:
    """One of the encoder slots, waited for no longer than the deadline allows."""
    wait = None if deadline is None else deadline.check("mp3 encoder slot")
    if not _ENCODERS.acquire(timeout=wait):
        raise DeadlineExceeded(_OUT_OF_TIME, detail="no mp3 encoder free before the deadline")
    try:
        yield
    finally:
        _ENCODERS.release()


@cache
def _memory_tmp() -> str | None:
    shm = Path("/dev/shm")  # noqa: S108  private TemporaryDirectory inside it
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _ffmpeg(
    binary: str,
    args: list[str],
    stdin: Audio,
    *,
    expect_stdout: bool = True,
    deadline: Deadline | None = None,
) -> bytes:
    return _run_ffmpeg(binary, args, stdin, expect_stdout=expect_stdout, deadline=deadline)[0]


def _run_ffmpeg(
    binary: str,
    args: list[str],
    stdin: Audio,
    *,
    expect_stdout: bool = True,
    deadline: Deadline | None = None,
    loglevel: str = "error",
) -> tuple[bytes, bytes]:
    """ffmpeg in its own process group, so that at the deadline it is killed with anything it
    started (a wrapper script's children too) and no process outlives the job. Answers its stdout
    and its log."""
    timeout = None if deadline is None else deadline.check("ffmpeg")
    command = [binary, "-hide_banner", "-nostats", "-loglevel", loglevel, "-nostdin", "-y", *args]
    pipe = subprocess.PIPE
    with subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=pipe, start_new_session=True) as proc:
        feeder = _feed(proc, stdin)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):  # the group is gone once all of it has exited
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DeadlineExceeded(_OUT_OF_TIME, detail=f"ffmpeg killed after {timeout:.1f} s") from None
        finally:
            feeder.join()  # ended: ffmpeg read everything, or it is gone and the write broke
    if proc.returncode != 0 or (expect_stdout and not stdout):
        raise subprocess.CalledProcessError(proc.returncode, binary, stdout, stderr)
    return stdout, stderr


def _feed(proc: subprocess.Popen[bytes], data: Audio) -> threading.Thread:
    """ffmpeg's input written by one blocking write on a thread of its own, which holds no GIL while
    the kernel moves the bytes. communicate() would write it 4 KB at a time from Python: 2,600 turns
    of its loop for a 60 s master, each waiting for the GIL that the uploads and the peaks running
    beside the encode also want, while ffmpeg waits for its input. The pipe is widened to 1 MB (the
    unprivileged limit) where the kernel allows, so ffmpeg reads big blocks."""
    pipe = cast(IO[bytes], proc.stdin)
    proc.stdin = None  # communicate() then only reads, and never closes the pipe under the write
    with suppress(OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    def write() -> None:
        # A broken pipe means ffmpeg stopped reading: it failed or was killed, and its exit says why.
        with suppress(BrokenPipeError), pipe:
            pipe.write(data)

    thread = threading.Thread(target=write, name="ffmpeg-input", daemon=True)
    thread.start()
    return thread


def decoded_seconds(data: Audio, input_format: str, ffmpeg: str, deadline: Deadline | None = None) -> float:
    """How long `data` plays when ffmpeg decodes it as `input_format` (wav or mp3) and nothing else:
    decoded to 8 kHz mono 16-bit, 16 KB a second, so even 190 s costs little memory."""
    pcm = _ffmpeg(
        ffmpeg,
        ["-f", input_format, "-i", "pipe:0", "-ac", "1", "-ar", "8000", "-f", "s16le", "pipe:1"],
        data,
        deadline=deadline,
    )
    return len(pcm) / 2 / 8000
