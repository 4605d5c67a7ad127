"""Lossless gain on an encoded MP3, as mp3gain does: every granule's `global_gain` (ISO/IEC 11172-3
and 13818-3 Layer III side information) sets its quantizer step, and one unit more scales the
decoded granule by 2^(1/4), 1.505 dB. So the preview is encoded once, while its loudness is
measured in the same ffmpeg run, and its gain is applied afterwards in steps of 1.5 dB (a loudness
error of at most 0.75 LU), touching a few bytes per frame and no audio.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache

STEP_DB = 20 * math.log10(2**0.25)  # 1.505 dB per global_gain unit

_BITRATES_KBPS = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),  # MPEG-1 Layer III
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),  # MPEG-2 and 2.5 Layer III
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_GAIN_OFFSET = 21  # bits from a granule's side information to its global_gain (12 + 9)


class NotLayer3(ValueError):
    """The bytes are not a stream of MPEG Layer III frames this module can adjust."""


def steps_for(wanted_db: float, allowed_db: float) -> int:
    """The nearest step to the wanted gain that stays within the allowed one."""
    return min(round(wanted_db / STEP_DB), math.floor(allowed_db / STEP_DB + 1e-9))


def apply_gain(mp3: bytes, steps: int) -> tuple[bytes, int]:
    """The MP3 with every granule's gain moved by `steps` (clamped, as mp3gain does, so that no
    granule leaves the field's 0..255 range), and the steps applied."""
    if steps == 0:
        return mp3, 0
    data = bytearray(mp3)
    applied = apply_gain_in_place(data, steps)
    return bytes(data), applied


def apply_gain_in_place(data: bytearray, steps: int) -> int:
    """apply_gain on a buffer the caller owns (the preview just read from ffmpeg), with no copy of
    it: a few bytes per frame change. Answers the steps applied."""
    if steps == 0:
        return 0
    positions = list(_gain_positions(data))
    if not positions:
        raise NotLayer3("no Layer III audio frames")
    gains = [_read8(data, bit) for bit in positions]
    steps = max(-min(gains), min(steps, 255 - max(gains)))
    for bit, gain in zip(positions, gains, strict=True):
        _write8(data, bit, gain + steps)
    return steps


def _gain_positions(data: bytearray) -> Iterator[int]:
    """The bit offset of every granule's global_gain, frame by frame (the Xing/Info frame and tags
    skipped)."""
    offset = _skip_id3v2(data)
    while offset + 4 <= len(data):
        header = int.from_bytes(data[offset : offset + 4], "big")
        frame = _frame(header)
        if frame is None:
            return  # a trailing tag (ID3v1, APE) or the end
        length, side_bytes, slots = frame
        side = offset + 4
        if bytes(data[side + side_bytes : side + side_bytes + 4]) not in (b"Xing", b"Info"):
            for slot in slots:
                yield side * 8 + slot + _GAIN_OFFSET
        offset += length


@lru_cache(maxsize=256)  # a constant-bitrate stream has two headers (padded or not): read once each
def _frame(header: int) -> tuple[int, int, tuple[int, ...]] | None:
    """(frame length, side information bytes, each granule's bit offset in the side information),
    or None when this is not a Layer III frame header."""
    if header >> 21 != 0x7FF or (header >> 17) & 3 != 1:
        return None
    version = (header >> 19) & 3
    bitrate_index, rate_index = (header >> 12) & 15, (header >> 10) & 3
    if version == 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    if not (header >> 16) & 1:
        raise NotLayer3("frames with a CRC are not adjusted (the CRC covers the side information)")
    mono = (header >> 6) & 3 == 3
    channels = 1 if mono else 2
    mpeg1 = version == 3
    bitrate = _BITRATES_KBPS[1 if mpeg1 else 2][bitrate_index] * 1000
    rate = _RATES[version][rate_index]
    length = (144 if mpeg1 else 72) * bitrate // rate + ((header >> 9) & 1)
    if mpeg1:
        start = 9 + (5 if mono else 3) + 4 * channels
        slots = tuple(start + 59 * i for i in range(2 * channels))
        side_bytes = 17 if mono else 32
    else:
        start = 8 + (1 if mono else 2)
        slots = tuple(start + 63 * i for i in range(channels))
        side_bytes = 9 if mono else 17
    return length, side_bytes, slots


def _skip_id3v2(data: bytearray) -> int:
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = 0
    for byte in data[6:10]:
        size = (size << 7) | (byte & 0x7F)
    footer = 10 if data[5] & 0x10 else 0
    return 10 + size + footer


def _read8(data: bytearray, bit: int) -> int:
    byte, shift = bit >> 3, 8 - (bit & 7)
    return (((data[byte] << 8) | data[byte + 1]) >> shift) & 0xFF


def _write8(data: bytearray, bit: int, value: int) -> None:
    byte, shift = bit >> 3, 8 - (bit & 7)
    word = ((data[byte] << 8) | data[byte + 1]) & ~(0xFF << shift) | (value << shift)
    data[byte], data[byte + 1] = word >> 8, word & 0xFF
