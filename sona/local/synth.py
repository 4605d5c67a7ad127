"""The offline synthesiser: simple, prompt-dependent audio of any length. It is NOT Stable Audio;
it only lets the whole flow run with no key and no network."""

from __future__ import annotations

import array
import hashlib
import io
import math
import wave

RATE = 44_100
LABEL = "offline synthesiser (not Stable Audio)"


def _chord(prompt: str) -> list[int]:
    digest = hashlib.sha256(prompt.encode()).digest()
    root = 110 + digest[0] % 110  # whole hertz, so one second repeats exactly
    ratios = ((1, 1), (5, 4), (3, 2), (2, 1))
    return [root * a // b for a, b in ratios[: 2 + digest[1] % 3]]


def _one_second(prompt: str) -> bytes:
    freqs = _chord(prompt)
    scale = 9000 / len(freqs)
    samples = array.array("h")
    for i in range(RATE):
        t = i / RATE
        left = sum(math.sin(2 * math.pi * f * t) for f in freqs[::2]) * scale
        right = sum(math.sin(2 * math.pi * f * t + 0.3) for f in freqs[1::2] or freqs) * scale
        samples.append(int(left))
        samples.append(int(right))
    return samples.tobytes()


def synthesize_pcm(prompt: str, seconds: float) -> bytes:
    """16-bit stereo PCM at 44.1 kHz, with a fade in and out."""
    from sona.audio import AudioSegment  # pydub, imported without its PATH warning

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
