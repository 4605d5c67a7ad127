"""A job's row as the state functions return it, what a completed job records, and the shapes
inside the plug-in's JSON columns. Apart from sona/models.py, which the doors' first answers read:
they read no row, and defining these models cost each cold start about 5 ms (PERFORMANCE.md, cold
start). Each model is built on its first use (defer_build)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sona.models import JobStage, JobStatus


class Job(BaseModel):
    """A row of public.jobs as the state functions return it."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    id: uuid.UUID
    user_id: uuid.UUID | None = None
    prompt: str
    duration: int
    quality: str
    mode: str
    # Audio-to-audio: the source file in the inputs bucket, and how far to move from it (0..1).
    input_path: str | None = None
    strength: float | None = None
    status: JobStatus
    attempts: int = 0
    # A finishing attempt: the paid attempts are spent, so it may only complete from stored files.
    reuse_only: bool = False
    lease_token: uuid.UUID | None = None
    lease_expires_at: datetime | None = None
    run_after: datetime | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error_message: str | None = None
    wav_url: str | None = None
    mp3_url: str | None = None
    result_url: str | None = None
    audio: dict[str, Any] | None = None
    stage: JobStage | None = None
    peaks_url: str | None = None
    # The plug-in's columns (docs/plugin-client.md): what it asks for, and what its player reads.
    musical_key: Any = None  # {"key","scale"}, or a JSON string holding it
    producer_config: Any = None  # {"type","bpm","timeSignature","bars"}, likewise
    naming_convention: Any = None  # {"parameters","separator"}, likewise
    skip_naming: bool | None = None
    user_email: str | None = None
    enhanced_prompt: str | None = None
    filename: str | None = None
    master_path: str | None = None
    preview_path: str | None = None
    # A paid generation the provider answers later by id (Stable Audio 3): fetched, never paid again.
    generation_id: str | None = None
    generation_model: str | None = None
    generations_lost: int = 0


class ClaimedJob(Job):
    """A job this invocation holds: the lease token fences every later write."""

    lease_token: uuid.UUID


class AudioInfo(BaseModel):
    """What the stored files really are, measured from them; kept on the row as `audio`."""

    model_config = ConfigDict(defer_build=True)

    duration_s: float
    sample_rate: int
    channels: int
    sample_width_bytes: int
    wav_bytes: int
    mp3_bytes: int
    mp3_bitrate: str
    provider_duration_s: float
    trimmed: bool
    model: str
    seed: int | None = None
    # What the plug-in shows (None on rows from before they were measured): the master's loudness
    # (ITU-R BS.1770 integrated, and true peak), the gain the preview got, the waveform peaks file.
    loudness_lufs: float | None = None
    true_peak_dbtp: float | None = None
    preview_gain_db: float | None = None
    peaks_url: str | None = None


@dataclass(frozen=True)
class Output:
    """What a completed job records: its files (URLs for the earlier worker's clients, object names
    for the plug-in's player), what they are, and what was asked for."""

    wav_url: str
    mp3_url: str
    audio: AudioInfo
    master_path: str | None = None
    preview_path: str | None = None
    filename: str | None = None
    enhanced_prompt: str | None = None


def json_column(value: Any) -> Any:
    """The plug-in's generate stores musical_key, producer_config and naming_convention as jsonb
    strings holding JSON (docs/plugin-client.md); other writers store objects. Both read the same; unreadable
    text reads as None, as the plug-in's worker did."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


# The shapes inside two of the plug-in's JSON columns (musical_key, producer_config), read by the
# job's plan (its prompt) and its download name alike.
class MusicalKey(BaseModel):
    model_config = ConfigDict(extra="ignore", defer_build=True)
    key: str | None = None
    scale: str = "major"


class ProducerConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, defer_build=True)
    type: str | None = None
    bpm: float | None = None
    time_signature: str | None = Field(default=None, alias="timeSignature")
    bars: int | None = None
