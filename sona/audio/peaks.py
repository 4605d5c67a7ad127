"""Waveform peaks of the master, in the audiowaveform JSON format (version 2) that BBC's
waveform-data.js and peaks.js read directly (bbc/audiowaveform doc/DataFormat.md): per pixel and
channel, the minimum and maximum sample, 8-bit, interleaved min/max by channel.

Computed from the master's PCM already in memory (no second decode), one window at a time with the
C `audioop` functions, so it needs no numpy and holds no copy of the samples.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from sona.audio.master import Pcm, audioop

# Points per clip: a 60 s clip at about 1,600 pixels draws sharply at plug-in widths, and a
# shorter clip keeps the same resolution (so a 2 s clip is not drawn from 50 points).
PEAK_POINTS = 1600


class WaveformPeaks(BaseModel):
    version: int = Field(default=2, frozen=True)
    channels: int
    sample_rate: int
    samples_per_pixel: int
    bits: int = Field(default=8, frozen=True)
    length: int
    data: list[int]


def waveform_peaks(pcm: Pcm, points: int = PEAK_POINTS) -> WaveformPeaks:
    """Min/max per pixel per channel. Stereo keeps both channels; other layouts are drawn as one
    channel holding the extremes of all (audioop splits only stereo)."""
    frames = pcm.frames
    per_pixel = max(1, -(-frames // points))
    step = per_pixel * pcm.frame_size
    shift = 8 * pcm.width - 8  # to 8 bits: -32768..32767 becomes -128..127
    channels = 2 if pcm.channels == 2 else 1
    data: list[int] = []
    for start in range(0, frames * pcm.frame_size, step):
        window = pcm.samples[start : start + step]
        if pcm.width == 1:  # 8-bit WAV is unsigned
            window = memoryview(audioop.bias(window, 1, -128))
        for channel in _channels(window, pcm.width, pcm.channels):
            low, high = audioop.minmax(channel, pcm.width)
            data += (low >> shift, high >> shift)
    return WaveformPeaks(
        channels=channels,
        sample_rate=pcm.rate,
        samples_per_pixel=per_pixel,
        length=len(data) // (2 * channels),
        data=data,
    )


def _channels(window: memoryview, width: int, channels: int) -> tuple[bytes | memoryview, ...]:
    if channels == 2:
        return audioop.tomono(window, width, 1, 0), audioop.tomono(window, width, 0, 1)
    return (window,)
