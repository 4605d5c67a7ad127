"""The seam between the pipeline and whatever makes the audio. An engine is one of two shapes:

- synchronous (Stable Audio 2.5): the paid call answers the audio itself;
- by id (Stable Audio 3; later TangoFlux on Replicate: create a prediction, poll it, read its output
  URL): `submit` pays and answers the generation's id at once, `fetch` answers the audio, or None
  while it is still being made. The id is written to the row before anyone waits, so a later
  attempt fetches what was paid for instead of paying again (sona/job/generations.py).

sona/job/modes.py's MODELS names each model's engine; the pipeline looks the engine up by that name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from sona.deadline import Deadline
from sona.engines.stable_audio import GenerationRequest
from sona.models import GeneratedAudio


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
Engines = Mapping[str, Engine]
