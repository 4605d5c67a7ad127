"""The offline synthesiser: simple, prompt-dependent audio of any length. It is NOT Stable Audio;
it only lets the whole flow run with no key and no network."""

from __future__ import annotations

import array
import hashlib
import io
import math
import wave
from collections.abc import Iterator
from itertools import repeat
from operator import add, mul, truediv

RATE = 44_100
LABEL = "offline synthesiser (not Stable Audio)"


def _chord(prompt: str) -> list[int]:
    digest = hashlib.sha256(prompt.encode()).digest()
    root = 110 + digest[0] % 110  # whole hertz, so one second repeats exactly
    ratios = ((1, 1), (5, 4), (3, 2), (2, 1))
    return [root * a // b for a, b in ratios[: 2 + digest[1] % 3]]


def _wave(freq: int, phase: float) -> Iterator[float]:
    """sin(2 pi f t + phase) for each sample t of one second, iterated in C (map over itertools):
    the same floating-point steps as a Python loop, a third of the time (jobs run by the suite
    spent most of the double's time here)."""
    times = map(truediv, range(RATE), repeat(RATE))
    angles: Iterator[float] = map(mul, repeat(2 * math.pi * freq), times)
    if phase:
        angles = map(add, angles, repeat(phase))
    return map(math.sin, angles)


def _channel(freqs: list[int], phase: float, scale: float) -> array.array[int]:
    total = _wave(freqs[0], phase)
    for freq in freqs[1:]:
        total = map(add, total, _wave(freq, phase))
    return array.array("h", map(int, map(mul, total, repeat(scale))))


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
