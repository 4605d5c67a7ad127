"""The seam between the pipeline and whatever makes the audio: the one request every engine takes,
and the two shapes an engine comes in.

- synchronous (Stable Audio 2.5): the paid call answers the audio itself;
- by id (Stable Audio 3, TangoFlux on Replicate): `submit` pays and answers the generation's id at
  once, `fetch` answers the audio, or None while it is still being made. The id is written to the row
  before anyone waits, so a later attempt fetches what was paid for instead of paying again
  (sona/job/generations.py).

The request belongs to no provider: sona/job/modes.py decides every field of it from the row and
sona/catalog.py, and each engine encodes it for its own API. The pipeline finds a request's engine
by its model (Engines, built by sona/services.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

from sona.audio.input_audio import InputAudio
from sona.deadline import Deadline
from sona.models import GeneratedAudio

Kind = Literal["text-to-audio", "audio-to-audio"]
AUDIO_TO_AUDIO: Kind = "audio-to-audio"


@dataclass(frozen=True)
class GenerationRequest:
    """One paid generation as a row asked for it. A dataclass, not a model: validating the input's
    bytes would copy up to 100 MB."""

    kind: Kind
    model: str
    prompt: str  # exactly what the provider is sent
    duration: int  # seconds asked of the provider
    steps: int
    cfg_scale: float | None = None
    # The job's owner, hashed, for the provider's abuse handling (sona/job/modes.py client_user_id).
    client_user_id: str | None = None
    seed: int | None = None
    # Audio-to-audio: the object in the inputs bucket, how far to move from it (0..1), and the
    # checked file once the pipeline has read it.
    input_object: str | None = None
    strength: float | None = None
    source: InputAudio | None = None

    def with_source(self, source: InputAudio) -> GenerationRequest:
        return replace(self, source=source)


@runtime_checkable
class SynchronousEngine(Protocol):
    def generate(self, request: GenerationRequest, deadline: Deadline) -> GeneratedAudio: ...


@runtime_checkable
class EngineById(Protocol):
    @property
    def poll_interval_s(self) -> float: ...

    def submit(self, request: GenerationRequest, deadline: Deadline) -> str:
        """Start one paid generation; its id once the provider accepted it."""
        ...

    def fetch(self, generation_id: str, model: str, deadline: Deadline) -> GeneratedAudio | None:
        """The finished audio, or None while it is being made; GenerationGone when the provider no
        longer knows the id."""
        ...


Engine = SynchronousEngine | EngineById
Engines = Mapping[str, Engine]  # by model name
