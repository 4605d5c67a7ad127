"""The models the function can generate with, one entry each: every fact about a model lives here
and nowhere else. A new model is one entry in MODELS; a new engine is one module under
sona/engines/ plus its models' entries (and its client in sona/services.py's table of engines).

Who reads what: the settings accept exactly these names and price them (sona/config.py); the job's
plan reads the limits, steps and strength of the model a row's mode names (sona/job/modes.py);
sona/services.py hands each model's engine to the pipeline, which asks the engine and never this
table. No imports from sona: the settings read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Quality = Literal["low", "medium", "high"]

# generate (the plug-in's Edge Function) and its table allow 1 to 180 s; rows that long are what the
# 2.x models serve, as before. This project's own table allows 1 to 380 s (stable-audio-3's limit;
# supabase/schemas/10_jobs.sql), and only a mode served by stable-audio-3 takes more than 180.
MAX_JOB_DURATION_S = 180
MAX_SA3_JOB_DURATION_S = 380
# Stable Audio's request limit (50 MB; 100 MB for stable-audio-3) less 100 kB for the other fields.
_STABLE_AUDIO_INPUT_BYTES = 50_000_000 - 100_000


@dataclass(frozen=True)
class Model:
    engine: str  # the engine that serves it (sona/services.py builds one client per engine)
    label: str  # the engine's name in a download name (the naming convention's `source`)
    max_duration_s: int  # the longest audio the provider makes
    steps: Mapping[Quality, int]  # the diffusion steps each quality asks for
    credits: float  # what `stats` prices one paid generation at (MODEL_CREDITS overrides it)
    max_row_s: int = MAX_JOB_DURATION_S  # the longest row it serves (else the job fails, unpaid)
    # Audio-to-audio: whether it takes an input at all (the earlier worker's STABLE_AUDIO_MODEL must),
    # the longest input, the most input bytes a request has room for, and the least strength.
    takes_input: bool = True
    max_input_s: float = 190.0
    max_input_bytes: int = _STABLE_AUDIO_INPUT_BYTES
    min_strength: float = 0.0

    @property
    def longest_s(self) -> int:
        """The longest row this model makes whole: a longer one goes to the mode's fallback."""
        return min(self.max_duration_s, self.max_row_s)


# Stable Audio 2.5 and 3 take 4 to 8 steps; Stable Audio 2 takes 30 to 100.
_FEW_STEPS: Mapping[Quality, int] = {"low": 4, "medium": 6, "high": 8}

MODELS: dict[str, Model] = {
    # Credits per paid generation (1 credit = $0.01): 20 for 2.5; 17 + 0.06 x steps for 2 (about
    # 20 at its 50 steps).
    "stable-audio-2.5": Model("stable-audio", "StableAudio", 190, _FEW_STEPS, 20, min_strength=0.01),
    "stable-audio-2": Model("stable-audio", "StableAudio", 190, {"low": 30, "medium": 50, "high": 100}, 20),
    # docs/outside-services.md, Stable Audio 3: 1-380 s, inputs 6-380 s, requests up to 100 MB; 26
    # credits per Stability's spec but 8 per its explainer of 2026-11-23 (unresolved).
    "stable-audio-3": Model(
        "stable-audio-3",
        "StableAudio",
        380,
        _FEW_STEPS,
        26,
        max_row_s=MAX_SA3_JOB_DURATION_S,
        max_input_s=380.0,
        max_input_bytes=100_000_000 - 100_000,
    ),
    # TangoFlux on Replicate (sona/engines/replicate.py): sound effects up to 30 s. The plug-in's own
    # worker cut a longer row to 30 s (worker.ts at 34648b7) and charged for the length asked; here a
    # longer row goes to the mode's fallback model instead (sona/job/modes.py model_for). Its steps
    # are what that worker sent (audio-clients/tango-flux.ts). Replicate bills GPU seconds, about
    # $0.003-0.02 a job: one credit's worth until a real prediction's predict_time says otherwise.
    # Text only.
    "tangoflux": Model(
        "tangoflux", "TangoFlux", 30, {"low": 25, "medium": 100, "high": 200}, 1, takes_input=False
    ),
}


def known_model(name: str) -> str:
    """A settings validator: the name of a model in MODELS."""
    if name not in MODELS:
        raise ValueError(f"must be one of {', '.join(MODELS)}, not {name!r}")
    return name


def input_model(name: str) -> str:
    """A settings validator: a model that also takes an input. The earlier worker's modes need one
    (audio-to-audio among them), and so does a mode's fallback for long rows (the Stable Audio
    models, which are exactly these)."""
    known_model(name)
    if not MODELS[name].takes_input:
        takes = [model for model, facts in MODELS.items() if facts.takes_input]
        raise ValueError(f"must be one of {', '.join(takes)} (a model that takes an input), not {name!r}")
    return name
