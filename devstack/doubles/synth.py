"""The offline synthesiser: simple, prompt-dependent audio of any length. It is NOT Stable Audio;
it only lets the whole flow run with no key and no network."""

from __future__ import annotations

import array
import hashlib
import io
import math
import wave
from functools import lru_cache

RATE = 44_100
LABEL = "offline synthesiser (not Stable Audio)"


def _chord(prompt: str) -> list[int]:
    digest = hashlib.sha256(prompt.encode()).digest()
    root = 110 + digest[0] % 110  # whole hertz, so one second repeats exactly
    ratios = ((1, 1), (5, 4), (3, 2), (2, 1))
    return [root * a // b for a, b in ratios[: 2 + digest[1] % 3]]


@lru_cache(maxsize=8)  # one per (scale, phase): 2 phases times 3 chord sizes
def _sine_table(scale: float, phase: float) -> array.array[int]:
    """int(scale * sin(2 pi k / RATE + phase)) for each sample k of one second: a 1 Hz wave."""
    return array.array("h", [int(scale * math.sin(2 * math.pi * k / RATE + phase)) for k in range(RATE)])


def _wave(freq: int, table: array.array[int]) -> array.array[int]:
    """One second of a whole-hertz wave read from the 1 Hz table: sample t is table[freq * t mod
    RATE], so it is the table's every freq-th sample, one slice per lap round it: freq slices in C
    instead of 44,100 sines in Python's float maps (a second of audio took 33-52 ms that way, about
    1.5 ms this way; the doubles in the suite's workers render every job's answer)."""
    out = array.array("h")
    start = 0
    while len(out) < RATE:
        out += table[start::freq]
        start = (start - RATE) % freq  # where the next lap's first sample lands
    return out


def _channel(freqs: list[int], phase: float, scale: float) -> array.array[int]:
    from sona.audio.master import audioop  # pydub's, imported without its PATH warning

    table = _sine_table(scale, phase)
    total = _wave(freqs[0], table)
    for freq in freqs[1:]:  # at most 9000 in all, so the sum stays a 16-bit sample
        total = array.array("h", audioop.add(total, _wave(freq, table), 2))  # sample by sample, in C
    return total


def _one_second(prompt: str) -> bytes:
    freqs = _chord(prompt)
    scale = 9000 / len(freqs)
    samples = array.array("h", bytes(4 * RATE))
    samples[0::2] = _channel(freqs[::2], 0.0, scale)  # left
    samples[1::2] = _channel(freqs[1::2] or freqs, 0.3, scale)  # right
    return samples.tobytes()


def synthesize_pcm(prompt: str, seconds: float) -> bytes:
    """16-bit stereo PCM at 44.1 kHz, with a fade in and out."""
    from sona.audio.master import AudioSegment  # pydub, imported without its PATH warning

    frames = max(1, round(seconds * RATE))
    block = _one_second(prompt)
    raw = (block * (frames // RATE + 1))[: frames * 4]
    segment = AudioSegment(data=raw, sample_width=2, frame_rate=RATE, channels=2)
    fade = min(200, len(segment) // 4)
    return bytes(segment.fade_in(fade).fade_out(fade).raw_data)


def synthesize_wav(prompt: str, seconds: float) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        writer.writeframes(synthesize_pcm(prompt, seconds))
    return out.getvalue()
