"""What a row asks for, decided here and nowhere else: its mode, the model (and so the engine) that
serves it, the exact prompt sent, the length asked for, the quality, the steps, strength and cfg
scale, the hashed user id, the input, and the download name. The model's facts come from
sona/catalog.py; the result is the one request every engine takes (sona/engines/base.py).

The plug-in's three modes and the prompt its own worker sent for each are docs/plugin-client.md's "The three
modes" (read from the plug-in's audio-worker/src/prepare-prompt.ts and worker.ts at 34648b7): the
musician's prompt, then ". " and the mode's phrases, comma-separated. A new mode is one entry in
MODES; a new model is one entry in sona/catalog.py's MODELS.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sona.audio.input_audio import input_object
from sona.catalog import MODELS, Model, Quality
from sona.config import Settings
from sona.engines.base import AUDIO_TO_AUDIO, GenerationRequest, Kind
from sona.errors import BadRequest
from sona.job.naming import download_name, number_text
from sona.rows import Job, MusicalKey, ProducerConfig, json_column

# Stable Audio's own prompt limit.
MAX_PROMPT_CHARS = 10_000
# The least a second of the WAV master takes: 16-bit 44.1 kHz stereo (a wider format is bigger).
MASTER_BYTES_PER_S = 44_100 * 2 * 2
# The plug-in's UI says draft and standard for the table's low and medium (docs/plugin-client.md).
QUALITIES: dict[str, Quality] = {
    "low": "low",
    "draft": "low",
    "medium": "medium",
    "standard": "medium",
    "high": "high",
}
# Sent when an audio-to-audio row names no strength: the API's own default (1) ignores the input.
DEFAULT_STRENGTH = 0.5


@dataclass(frozen=True)
class Mode:
    kind: Kind
    model_setting: str  # the Settings field naming the model that serves the mode
    # (musical key, producer config, duration) -> the phrases after the prompt; None: as written
    phrases: Callable[[MusicalKey | None, ProducerConfig | None, int], list[str]] | None = None
    # The Settings field naming the model for a row longer than the first makes (None: no fallback).
    fallback_setting: str | None = None


@dataclass(frozen=True)
class JobPlan:
    mode: str
    kind: Kind
    model: str
    engine: str  # the engine that serves the model (sona/catalog.py)
    prompt: str  # exactly what the provider is sent (kept on the row as enhanced_prompt)
    duration: int  # seconds asked of the provider
    quality: Quality
    filename: str | None  # the download name (plug-in modes; None for the earlier worker's)
    request: GenerationRequest  # what the engine is sent

    @property
    def limits(self) -> Model:
        return MODELS[self.model]


def plan_job(job: Job, settings: Settings) -> JobPlan:
    """Check the row and decide everything it asks for, before anything is paid for; bad input fails
    the job with a reason the plug-in shows."""
    mode = MODES.get(job.mode)
    if mode is None:
        raise BadRequest(
            f"The '{job.mode}' mode is not supported; choose designer, producer or creator "
            "(or text-to-audio, audio-to-audio)."
        )
    model_name = model_for(job.duration, mode, settings)
    model = MODELS[model_name]
    quality: Quality | None = QUALITIES.get(job.quality)
    if quality is None:
        raise BadRequest(
            f"The quality '{job.quality}' is unknown; choose low (draft), medium (standard) or high."
        )
    duration = job.duration  # the length asked for is the length made: never cut
    _fits_storage(duration, settings)
    prompt = clean_prompt(job.prompt)
    if not prompt:
        raise BadRequest("The prompt is empty. Describe the sound you want.")
    key, config = musical_key(job), producer_config(job)  # read once: the phrases and the name use them
    if mode.phrases is not None:
        prompt = f"{prompt}. {', '.join(mode.phrases(key, config, duration))}"
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    filename = None
    if job.mode in PLUGIN_MODES:
        filename = download_name(job, key, config, model.label)
    return JobPlan(
        mode=job.mode,
        kind=mode.kind,
        model=model_name,
        engine=model.engine,
        prompt=prompt,
        duration=duration,
        quality=quality,
        filename=filename,
        request=_request(job, settings, mode.kind, model_name, prompt, duration, quality),
    )


def _request(
    job: Job, settings: Settings, kind: Kind, model_name: str, prompt: str, duration: int, quality: Quality
) -> GenerationRequest:
    request = GenerationRequest(
        kind="text-to-audio",
        model=model_name,
        prompt=prompt,
        duration=duration,
        steps=MODELS[model_name].steps[quality],
        cfg_scale=settings.stable_audio_cfg_scale,
        client_user_id=client_user_id(job.user_id),
    )
    return _audio_to_audio(request, job, settings) if kind == AUDIO_TO_AUDIO else request


def _audio_to_audio(request: GenerationRequest, job: Job, settings: Settings) -> GenerationRequest:
    strength = DEFAULT_STRENGTH if job.strength is None else job.strength
    least = MODELS[request.model].min_strength
    if not least <= strength <= 1:
        raise BadRequest(f"The strength must be {least:g} to 1 with {request.model}, not {strength:g}.")
    name = input_object(job.input_path, job.user_id, settings.supabase_input_bucket)
    return replace(request, kind=AUDIO_TO_AUDIO, input_object=name, strength=strength)


def client_user_id(user_id: object) -> str | None:
    """The end user as the provider sees them: a hash, so the provider never learns our user ids."""
    if user_id is None:
        return None
    return hashlib.sha256(f"sona-user:{user_id}".encode()).hexdigest()


def model_for(duration: int, mode: Mode, settings: Settings) -> str:
    """The mode's model, or its fallback when the row is longer than the model makes (TangoFlux past
    30 s): chosen here, before anything is paid for, so the row, the prompt and the audio all say the
    length asked for. A length no configured model makes fails the job unpaid (its tokens come back)."""
    chosen = [str(getattr(settings, mode.model_setting))]
    fallback = getattr(settings, mode.fallback_setting) if mode.fallback_setting else None
    if fallback is not None:
        chosen.append(str(fallback))
    if duration >= 1:
        for name in chosen:
            if duration <= MODELS[name].longest_s:
                return name
    longest = max(MODELS[name].longest_s for name in chosen)
    raise BadRequest(f"The duration must be 1 to {longest} seconds, not {duration}.")


def _fits_storage(duration: int, settings: Settings) -> None:
    """A clip whose master cannot be stored would be paid for and lost: refuse it before paying."""
    limit = settings.stored_file_limit_bytes
    if duration * MASTER_BYTES_PER_S + 44 > limit:
        longest = (limit - 44) // MASTER_BYTES_PER_S
        raise BadRequest(
            f"A {duration} s clip is larger than the storage allows ({limit / 1e6:g} MB); "
            f"choose {longest} seconds or less.",
            detail="STORAGE_UPLOAD_LIMIT / STORAGE_FILE_SIZE_LIMIT",
        )


def clean_prompt(text: str) -> str:
    """Control characters (a pasted bell, a stray escape) become spaces; emoji and every other
    printable character stay. Leading and trailing space goes."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text).strip()


# -- the plug-in's JSON columns ----------------------------------------------------------------------


def musical_key(job: Job) -> MusicalKey | None:
    return _parsed(MusicalKey, job.musical_key)


def producer_config(job: Job) -> ProducerConfig | None:
    return _parsed(ProducerConfig, job.producer_config)


M = TypeVar("M", bound=BaseModel)


def _parsed(model: type[M], value: Any) -> M | None:
    """A JSON column read as an object or a JSON string; anything unreadable reads as None."""
    data = json_column(value)
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


# -- the phrases each mode adds ----------------------------------------------------------------------


def duration_phrase(seconds: int) -> str:
    if seconds <= 5:
        return "very short"
    if seconds <= 60:
        return f"{seconds} seconds"
    minutes, rest = divmod(seconds, 60)
    if rest == 0:
        return f"{minutes} minute{'s' if minutes > 1 else ''}"
    return f"{minutes}:{rest:02d} minutes"


def _key_phrase(key: MusicalKey | None) -> list[str]:
    return [f"{key.key} {key.scale}"] if key is not None and key.key else []


def _bpm_phrase(config: ProducerConfig | None) -> list[str]:
    return [f"{number_text(config.bpm)} BPM"] if config is not None and config.bpm else []


def designer_phrases(key: MusicalKey | None, config: ProducerConfig | None, duration: int) -> list[str]:
    """Sound effects: only their length matters."""
    return [duration_phrase(duration)]


def producer_phrases(key: MusicalKey | None, config: ProducerConfig | None, duration: int) -> list[str]:
    """Loops: tempo, key, metre and length in bars, then the duration."""
    phrases = [*_bpm_phrase(config), *_key_phrase(key)]
    if config is not None and config.time_signature:
        phrases.append(f"{config.time_signature} time")
    if config is not None and config.bars:
        phrases.append(f"{config.bars} bar{'s' if config.bars > 1 else ''}")
    return [*phrases, duration_phrase(duration)]


def creator_phrases(key: MusicalKey | None, config: ProducerConfig | None, duration: int) -> list[str]:
    """Songs: tempo and key, then the duration."""
    return [*_bpm_phrase(config), *_key_phrase(key), duration_phrase(duration)]


MODES: dict[str, Mode] = {
    # The plug-in's modes (its mode switch): one model setting each.
    "designer": Mode("text-to-audio", "designer_model", designer_phrases, "designer_fallback_model"),
    "producer": Mode("text-to-audio", "producer_model", producer_phrases, "producer_fallback_model"),
    "creator": Mode("text-to-audio", "creator_model", creator_phrases, "creator_fallback_model"),
    # The earlier worker's guide: the prompt as written.
    "default": Mode("text-to-audio", "stable_audio_model"),
    "text-to-audio": Mode("text-to-audio", "stable_audio_model"),
    "audio-to-audio": Mode("audio-to-audio", "stable_audio_model"),
}
PLUGIN_MODES = frozenset({"designer", "producer", "creator"})
