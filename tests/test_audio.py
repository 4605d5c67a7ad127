"""Audio: the provider's overshoot is trimmed to the exact duration, the WAV master keeps the
provider's format when nothing is cut, the MP3 preview is a real MP3 at the set bitrate."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import threading
import time
import tracemalloc
import wave
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from sona.audio.ffmpeg import find_ffmpeg
from sona.audio.master import decode, encode_mp3, make_master
from sona.deadline import Deadline
from sona.errors import DeadlineExceeded, PermanentError
from tests.support import decoded_seconds, wav_bytes

FFMPEG = find_ffmpeg()


def ffmpeg_info(data: bytes, fmt: str) -> str:
    return subprocess.run(
        [FFMPEG, "-hide_banner", "-f", fmt, "-i", "pipe:0"], input=data, capture_output=True, check=False
    ).stderr.decode()


def test_a_61_6_second_answer_becomes_exactly_60_seconds_of_wav_and_mp3() -> None:
    master = make_master(wav_bytes(61.6), 60, FFMPEG)
    mp3 = encode_mp3(master.wav, "192k", FFMPEG)

    assert master.trimmed
    assert round(master.provider_duration_s, 2) == 61.6
    assert f"{master.duration_s:.2f}" == "60.00"
    assert f"{decoded_seconds(master.wav, 'wav'):.2f}" == "60.00"
    assert f"{decoded_seconds(mp3, 'mp3'):.2f}" == "60.00"


def test_the_mp3_preview_is_an_mp3_at_the_set_bitrate() -> None:
    mp3 = encode_mp3(wav_bytes(3), "128k", FFMPEG)
    info = ffmpeg_info(mp3, "mp3")
    assert re.search(r"Audio: mp3.*44100 Hz, stereo.*128 kb/s", info), info


def test_a_trimmed_end_fades_out_instead_of_clicking() -> None:
    master = make_master(wav_bytes(2.5), 2, FFMPEG)
    with wave.open(io.BytesIO(master.wav)) as reader:
        frames = reader.readframes(reader.getnframes())
    last = int.from_bytes(frames[-4:-2], "little", signed=True)
    assert abs(last) < 50  # the tone is at 8000; the fade brings the last sample near zero


@pytest.mark.parametrize("width", [2, 3])
def test_without_a_trim_the_master_is_the_providers_own_bytes(width: int) -> None:
    original = wav_bytes(4, width=width)
    master = make_master(original, 5, FFMPEG)
    assert master.wav == original
    assert (master.sample_rate, master.channels, master.sample_width, master.trimmed) == (
        44100,
        2,
        width,
        False,
    )


@pytest.mark.parametrize(
    ("seconds", "requested", "width", "channels"),
    [(61.6, 60, 2, 2), (2.5, 2, 3, 2), (3.2, 3, 2, 1), (4, 5, 2, 2)],
    ids=["60s-trimmed", "24-bit-trimmed", "mono-trimmed", "nothing-to-cut"],
)
def test_a_wav_answer_in_a_bytearray_becomes_the_master_in_place_with_the_same_bytes(
    seconds: float, requested: float, width: int, channels: int
) -> None:
    # The engines read answers into a bytearray; cutting it in place spares a second copy of the
    # master (10.6 MB for 60 s). The result is byte for byte the copying cut's.
    answer = wav_bytes(seconds, width=width, channels=channels)
    copied = make_master(answer, requested, FFMPEG)
    buffer = bytearray(answer)
    in_place = make_master(buffer, requested, FFMPEG)
    assert in_place.wav is buffer
    assert in_place == replace(copied, wav=buffer)
    assert bytes(in_place.wav) == copied.wav


def test_the_master_of_a_wav_answer_holds_no_second_copy_of_its_samples() -> None:
    answer = bytearray(wav_bytes(61.6))
    tracemalloc.start()
    try:
        make_master(answer, 60, FFMPEG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(answer) / 10, f"{peak} bytes allocated to cut a {len(answer)}-byte answer"


def test_a_mono_48k_answer_keeps_its_format_when_trimmed() -> None:
    master = make_master(wav_bytes(3.2, rate=48_000, channels=1), 3, FFMPEG)
    assert (master.sample_rate, master.channels, master.duration_s) == (48_000, 1, 3.0)


def test_an_mp3_answer_is_decoded_through_ffmpeg() -> None:
    mp3 = encode_mp3(wav_bytes(6.2), "192k", FFMPEG)
    master = make_master(mp3, 6, FFMPEG)
    assert master.trimmed
    assert master.duration_s == 6.0
    assert master.wav[:4] == b"RIFF"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<html>403</html>",
        b"RIFF\x00\x00\x00\x00WAVEjunk",
        wav_bytes(1)[:30],
        b"ID3" + bytes(200),
        bytes(1000),
    ],
    ids=["empty", "html", "riff-junk", "truncated-header", "id3-only", "zeros"],
)
def test_what_is_not_audio_fails_with_a_clear_message(data: bytes) -> None:
    with pytest.raises(PermanentError, match="audio service returned"):
        decode(data, FFMPEG)


def test_a_truncated_wav_is_not_taken_for_audio() -> None:
    data = wav_bytes(2)
    with pytest.raises(PermanentError):
        decode(data[: len(data) // 2], FFMPEG)


def test_a_24_bit_master_stays_24_bit_when_trimmed() -> None:
    master = make_master(wav_bytes(2.4, width=3), 2, FFMPEG)
    with wave.open(io.BytesIO(master.wav)) as reader:
        assert (reader.getsampwidth(), reader.getnframes()) == (3, 88_200)
    assert master.sample_width == 3


def test_a_configured_ffmpeg_that_does_not_exist_is_an_error_not_a_fallback() -> None:
    from sona.errors import FfmpegMissing

    with pytest.raises(FfmpegMissing, match="FFMPEG_BINARY=/no/such/ffmpeg"):
        find_ffmpeg("/no/such/ffmpeg")


def test_the_wheels_ffmpeg_is_preferred_to_whatever_the_image_has_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imageio_ffmpeg

    image_ffmpeg = tmp_path / "ffmpeg"
    image_ffmpeg.write_text("#!/bin/sh\nexit 1\n")
    image_ffmpeg.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("FFMPEG_BINARY", raising=False)
    find_ffmpeg.cache_clear()
    try:
        assert find_ffmpeg() == imageio_ffmpeg.get_ffmpeg_exe()
    finally:
        find_ffmpeg.cache_clear()


def test_no_more_encoders_run_at_once_than_there_are_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time
    from pathlib import Path

    import sona.audio.master

    running, most, lock = 0, 0, threading.Lock()

    def counting_ffmpeg(binary: str, args: list[str], stdin: bytes, **kwargs: object) -> tuple[bytes, bytes]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)  # long enough for the other threads to arrive
        with lock:
            running -= 1
        Path(args[-1]).write_bytes(b"mp3")  # where encode_mp3 reads the preview from
        return b"", b""

    monkeypatch.setattr(sona.audio.master, "_run_ffmpeg", counting_ffmpeg)
    encode = sona.audio.master.encode_mp3
    threads = [threading.Thread(target=encode, args=(b"", "192k", "ffmpeg")) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == min(8, len(os.sched_getaffinity(0)))


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_exit(pid: int, timeout_s: float) -> None:
    """Until the process has exited: its pidfd turns readable then (Linux 5.3), no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)


def _stuck_ffmpeg(folder: Path) -> Path:
    """An ffmpeg that starts a child and never finishes; it writes both process ids down."""
    script = folder / "ffmpeg"
    script.write_text(f'#!/bin/sh\nsleep 60 &\necho "$$ $!" > {folder}/pids\nwait\n')
    script.chmod(0o755)
    return script


STUCK_CALLS: list[tuple[str, Callable[[str, Deadline], object]]] = [
    ("encode", lambda ffmpeg, deadline: encode_mp3(wav_bytes(1), "192k", ffmpeg, deadline)),
    ("decode", lambda ffmpeg, deadline: make_master(b"ID3" + bytes(256), 1, ffmpeg, deadline)),
    # 3.5 MB, more than the widest pipe: the input's writer is still blocked when ffmpeg is killed.
    ("encode-over-a-pipe", lambda ffmpeg, deadline: encode_mp3(wav_bytes(20), "192k", ffmpeg, deadline)),
]


def _input_writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ffmpeg-input"]


@pytest.mark.parametrize(("name", "call"), STUCK_CALLS, ids=[n for n, _ in STUCK_CALLS])
def test_ffmpeg_still_running_at_the_deadline_is_killed_with_its_children(
    tmp_path: Path, name: str, call: Callable[[str, Deadline], object]
) -> None:
    ffmpeg = _stuck_ffmpeg(tmp_path)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        call(str(ffmpeg), Deadline(1.0))
    assert time.monotonic() - started < 3.0
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    for pid in pids:
        _wait_exit(pid, 5)  # the orphaned child is reaped by init, not by us
    assert [p for p in pids if _running(p)] == []
    assert _input_writers() == []


def test_an_ffmpeg_that_exits_without_reading_its_input_fails_as_unreadable_audio(tmp_path: Path) -> None:
    ffmpeg = tmp_path / "ffmpeg"
    ffmpeg.write_text("#!/bin/sh\necho 'Invalid data found when processing input' >&2\nexit 1\n")
    ffmpeg.chmod(0o755)
    answer = b"ID3" + bytes(3_000_000)  # not a WAV, so it goes to ffmpeg; more than the pipe holds
    with pytest.raises(PermanentError, match="could not be read"):
        make_master(answer, 1, str(ffmpeg), Deadline(10))
    assert _input_writers() == []


def test_waiting_for_a_busy_encoder_ends_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import sona.audio.master

    busy = threading.BoundedSemaphore(1)
    busy.acquire()
    monkeypatch.setattr(sona.audio.master, "_ENCODERS", busy)
    with pytest.raises(DeadlineExceeded, match="ran out of time"):
        encode_mp3(wav_bytes(1), "192k", FFMPEG, Deadline(0.3))
