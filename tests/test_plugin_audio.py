"""What the plug-in draws and plays: waveform peaks from the master, and a loudness-matched preview."""

from __future__ import annotations

import array
import io
import json
import math
import random
import subprocess
import tempfile
import wave

import pytest

from sona.audio.ffmpeg import find_ffmpeg
from sona.audio.loudness import CEILING_DBTP, FILTER, TARGET_LUFS, Loudness, parse_summary
from sona.audio.master import encode_preview, read_wav
from sona.audio.mp3gain import STEP_DB, apply_gain
from sona.audio.peaks import PEAK_POINTS, waveform_peaks
from tests.support import wav_bytes

FFMPEG = find_ffmpeg()
RATE = 44_100
PERIOD = 441  # samples of one period of the 1 kHz test tone at RATE (10 cycles)


def tone_wav(seconds: float, level_dbfs: float, *, clicks_dbfs: float | None = None) -> bytes:
    """A stereo 16-bit 1 kHz tone (the right channel a little quieter, so the channels differ),
    optionally with a short loud click every second (a quiet master with high peaks). A 1 kHz sine
    repeats every 441 samples at 44.1 kHz, and a second is 100 of those: one second is computed and
    repeated (a sample at a time, a 60 s tone cost about 3 CPU-s)."""
    amplitude = 32767 * 10 ** (level_dbfs / 20)
    click = None if clicks_dbfs is None else round(32767 * 10 ** (clicks_dbfs / 20))
    second = array.array("h")
    for i in range(RATE):
        value = round(amplitude * math.sin(2 * math.pi * 1000 * (i % PERIOD) / RATE))
        if click is not None and i < 3:
            value = click
        second.extend((value, round(value * 0.7)))
    frames = round(seconds * RATE)
    whole, rest = divmod(frames, RATE)
    samples = second * whole + second[: 2 * rest]
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        writer.writeframes(samples.tobytes())
    return out.getvalue()


def measured(mp3: bytes) -> Loudness:
    """The preview's loudness as a player decodes it (from a file, so the encoder's padding is known)."""
    with tempfile.NamedTemporaryFile(suffix=".mp3") as f:
        f.write(mp3)
        f.flush()
        log = subprocess.run(
            [FFMPEG, "-hide_banner", "-nostats", "-i", f.name, "-af", FILTER, "-f", "null", "-"],
            capture_output=True,
            check=True,
        ).stderr
    return parse_summary(log.decode())


@pytest.mark.parametrize(
    ("channels", "width"), [(2, 2), (1, 2), (2, 3)], ids=["stereo-16", "mono-16", "stereo-24"]
)
def test_peaks_are_audiowaveform_v2_json_with_a_pair_per_pixel_and_channel(channels: int, width: int) -> None:
    pcm = read_wav(wav_bytes(7.3, channels=channels, width=width))
    peaks = json.loads(waveform_peaks(pcm).model_dump_json())
    assert {k: peaks[k] for k in ("version", "channels", "sample_rate", "bits")} == {
        "version": 2,
        "channels": channels,
        "sample_rate": RATE,
        "bits": 8,
    }
    assert len(peaks["data"]) == peaks["length"] * channels * 2
    spp = peaks["samples_per_pixel"]
    assert spp * (peaks["length"] - 1) < pcm.frames <= spp * peaks["length"]
    assert all(-128 <= v <= 127 for v in peaks["data"])


def test_a_60_s_master_is_drawn_from_1000_to_2000_points() -> None:
    peaks = waveform_peaks(read_wav(tone_wav(60, -6)))
    assert 1000 <= peaks.length <= 2000
    assert peaks.length == PEAK_POINTS


def test_each_channels_peak_extremes_are_the_masters_at_8_bits() -> None:
    wav = tone_wav(5, -3)
    pcm = read_wav(wav)
    samples = array.array("h", bytes(pcm.samples))
    peaks = waveform_peaks(pcm)
    for channel in range(2):
        mins = peaks.data[2 * channel :: 4]
        maxes = peaks.data[2 * channel + 1 :: 4]
        of_master = samples[channel::2]
        assert (min(mins), max(maxes)) == (min(of_master) >> 8, max(of_master) >> 8)
    assert max(peaks.data[1::4]) > max(peaks.data[3::4])  # the quieter right channel stays quieter


def test_each_pixel_holds_the_extremes_of_its_own_samples() -> None:
    pcm = read_wav(tone_wav(2, -20, clicks_dbfs=-1))  # a click in the first pixel only
    samples = array.array("h", bytes(pcm.samples))
    peaks = waveform_peaks(pcm)
    spp = peaks.samples_per_pixel
    for pixel in (0, 1, peaks.length - 1):
        left = samples[2 * spp * pixel : 2 * spp * (pixel + 1) : 2]
        assert peaks.data[4 * pixel : 4 * pixel + 2] == [min(left) >> 8, max(left) >> 8]


def _random_wav(channels: int, width: int, frames: int = 4_000) -> bytes:
    """Full-scale random samples (every byte varies), so each pixel's extremes differ."""
    noise = random.Random(channels * 10 + width)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(8_000)
        writer.writeframes(noise.randbytes(frames * channels * width))
    return out.getvalue()


def _reference_peaks(pcm_bytes: bytes, channels: int, width: int, per_pixel: int) -> list[int]:
    """Each pixel's min and max per drawn channel, sample by sample: a signed sample (8-bit WAV is
    unsigned) shifted down to 8 bits; layouts other than stereo drawn as one channel."""
    values = [
        int.from_bytes(pcm_bytes[i : i + width], "little", signed=width > 1) - (128 if width == 1 else 0)
        for i in range(0, len(pcm_bytes), width)
    ]
    shifted = [v >> (8 * width - 8) for v in values]
    drawn = [shifted[c::2] for c in range(2)] if channels == 2 else [shifted]
    step = per_pixel * (1 if channels == 2 else channels)
    data: list[int] = []
    for start in range(0, len(drawn[0]), step):
        for channel in drawn:
            data += (min(channel[start : start + step]), max(channel[start : start + step]))
    return data


@pytest.mark.parametrize(
    ("channels", "width"),
    [(1, 1), (2, 1), (1, 2), (2, 2), (2, 3), (2, 4), (6, 2)],
    ids=["mono-8", "stereo-8", "mono-16", "stereo-16", "stereo-24", "stereo-32", "5.1-16"],
)
def test_every_pixels_peaks_are_its_samples_extremes_at_8_bits_in_every_layout(
    channels: int, width: int
) -> None:
    pcm = read_wav(_random_wav(channels, width))
    peaks = waveform_peaks(pcm, points=37)  # pixels that do not divide the frames: a short last one
    expected = _reference_peaks(bytes(pcm.samples), channels, width, peaks.samples_per_pixel)
    assert peaks.data == expected


@pytest.mark.parametrize(
    ("level_dbfs", "kind"), [(-35.0, "quiet"), (-1.0, "loud")], ids=["quiet-master", "loud-master"]
)
def test_the_preview_is_within_1_lu_of_the_target_and_under_the_ceiling(level_dbfs: float, kind: str) -> None:
    wav = tone_wav(12, level_dbfs)
    preview = encode_preview(wav, "192k", FFMPEG)
    assert preview.loudness.integrated_lufs is not None
    assert abs(preview.loudness.integrated_lufs - TARGET_LUFS) > 5, f"the {kind} master must need a gain"
    played = measured(preview.mp3)
    assert played.integrated_lufs is not None and played.true_peak_dbtp is not None
    assert abs(played.integrated_lufs - TARGET_LUFS) <= 1.0
    assert played.true_peak_dbtp < CEILING_DBTP


def test_a_quiet_master_with_high_peaks_keeps_them_under_the_ceiling_and_stays_below_the_target() -> None:
    wav = tone_wav(12, -40, clicks_dbfs=-3)
    preview = encode_preview(wav, "192k", FFMPEG)
    played = measured(preview.mp3)
    assert played.true_peak_dbtp is not None and played.true_peak_dbtp < CEILING_DBTP
    assert played.integrated_lufs is not None and played.integrated_lufs < TARGET_LUFS - 1


def test_the_masters_loudness_is_measured_per_bs1770() -> None:
    # A 1 kHz sine at -20 dBFS in both channels reads -20 LUFS (+/-0.1) on a BS.1770 meter, and its
    # true peak is its amplitude.
    samples = array.array("h")
    amplitude = 32767 * 10 ** (-20 / 20)
    for i in range(10 * RATE):
        value = round(amplitude * math.sin(2 * math.pi * 1000 * i / RATE))
        samples.extend((value, value))
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        writer.writeframes(samples.tobytes())
    preview = encode_preview(out.getvalue(), "192k", FFMPEG, normalize=False)
    assert preview.loudness.integrated_lufs == pytest.approx(-20, abs=0.2)
    assert preview.loudness.true_peak_dbtp == pytest.approx(-20, abs=0.2)


def test_without_normalisation_the_preview_keeps_the_masters_level() -> None:
    wav = tone_wav(8, -30)
    preview = encode_preview(wav, "192k", FFMPEG, normalize=False)
    assert preview.gain_db == 0.0
    played = measured(preview.mp3)
    assert played.integrated_lufs == pytest.approx(preview.loudness.integrated_lufs, abs=0.3)


def test_the_master_is_never_altered() -> None:
    wav = tone_wav(4, -35)
    kept = bytes(wav)
    encode_preview(wav, "192k", FFMPEG)
    assert wav == kept


@pytest.mark.parametrize("steps", [-6, -1, 2, 5])
def test_a_gain_step_on_the_encoded_frames_scales_the_decoded_preview_by_1_5_db(steps: int) -> None:
    plain = encode_preview(tone_wav(6, -24), "192k", FFMPEG, normalize=False).mp3
    adjusted, applied = apply_gain(plain, steps)
    before, after = measured(plain), measured(adjusted)
    assert applied == steps
    assert before.integrated_lufs is not None and after.integrated_lufs is not None
    # ebur128 prints loudness to 0.1 LU, so two readings differ by up to 0.1 from rounding alone
    assert after.integrated_lufs - before.integrated_lufs == pytest.approx(steps * STEP_DB, abs=0.11)
    assert len(adjusted) == len(plain)
