"""Loudness of the master (ITU-R BS.1770: K-weighted, gated integrated loudness, and true peak on a
4x oversampled signal), measured by ffmpeg's ebur128 filter in the run that encodes the preview,
and the preview's gain that follows from it.

The gain policy is the streaming services' one: bring the preview to -14 LUFS, but never let a
positive gain push the true peak above -1 dBTP (no limiter: the preview keeps the master's
dynamics, so a quiet master with high peaks stays below the target).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

TARGET_LUFS = -14.0
CEILING_DBTP = -1.0
# MP3 encoding moves inter-sample peaks a little; the ceiling keeps this much more headroom, so the
# preview's own true peak (measured on the decoded MP3 in tests/test_plugin_audio.py) stays under it.
CODEC_HEADROOM_DB = 0.5
# ebur128 reports -70 LUFS (its absolute gate) for silence: nothing there to normalise.
SILENCE_LUFS = -70.0

# What `ebur128=peak=true` logs at the end of a run (its "Summary" block).
FILTER = "ebur128=peak=true:framelog=verbose"
_INTEGRATED = re.compile(r"Integrated loudness:\s*I:\s*(?P<value>-?inf|-?[\d.]+) LUFS")
_TRUE_PEAK = re.compile(r"True peak:\s*Peak:\s*(?P<value>-?inf|-?[\d.]+) dBFS")


class LoudnessUnreadable(ValueError):
    """ffmpeg's run ended without the ebur128 summary (a build without the filter, or a crash)."""


@dataclass(frozen=True)
class Loudness:
    integrated_lufs: float | None  # None: silence (below the absolute gate)
    true_peak_dbtp: float | None  # None: digital silence


def parse_summary(log: str) -> Loudness:
    """The last summary in ffmpeg's log (there is one per run)."""
    integrated = _INTEGRATED.findall(_summary(log))
    peak = _TRUE_PEAK.findall(_summary(log))
    if not integrated or not peak:
        raise LoudnessUnreadable("no ebur128 summary in the ffmpeg log")
    lufs, dbtp = float(integrated[-1]), float(peak[-1])
    return Loudness(
        integrated_lufs=lufs if math.isfinite(lufs) and lufs > SILENCE_LUFS else None,
        true_peak_dbtp=dbtp if math.isfinite(dbtp) else None,
    )


def _summary(log: str) -> str:
    at = log.rfind("Summary:")
    return log[at:] if at >= 0 else ""


def wanted_gain_db(loudness: Loudness) -> tuple[float, float]:
    """The gain that reaches the target, and the most gain the ceiling allows (both in dB)."""
    if loudness.integrated_lufs is None:
        return 0.0, 0.0
    wanted = TARGET_LUFS - loudness.integrated_lufs
    if loudness.true_peak_dbtp is None:
        return wanted, wanted
    return wanted, CEILING_DBTP - CODEC_HEADROOM_DB - loudness.true_peak_dbtp
