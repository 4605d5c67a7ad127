"""Generations by id: the id is the payment (issue 22).

For an engine that answers an id and the audio later (sona/engines/base.py EngineById), one attempt:

1. finds an id on its row: fetches it (no POST), whatever the model settings now say;
2. finds none (or the provider no longer knows the one it found, which is forgotten and counted):
   pays once (POST), writes the id to the row (fenced by the lease), and only then waits;
3. waits by polling inside the attempt (PERFORMANCE.md: the wait is 10-40 s, and an attempt that
   left and came back would pay a claim, a task and a cold start per check).

A deadline, a crash, a reclaim or a Storage failure after this leaves the id on the row, so the next
attempt goes to 1. The one window left: the POST was accepted but its answer (the id) never reached
the row (the process died, or the connection dropped, between the provider accepting and the write).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sona.deadline import Deadline
from sona.engines.base import EngineById, GenerationRequest
from sona.errors import DatabaseUnavailable, GenerationGone, StaleLease, TransientError
from sona.models import GeneratedAudio
from sona.rows import ClaimedJob, Job

log = logging.getLogger(__name__)


class GenerationLedger(Protocol):
    def record_generation(self, job: ClaimedJob, generation_id: str, model: str) -> Job: ...
    def forget_generation(self, job: ClaimedJob, generation_id: str) -> Job: ...


@dataclass
class ById:
    """Fetch what the row says was paid for, else pay once and write the id before waiting."""

    store: GenerationLedger
    sleep: Callable[[float], None] = time.sleep

    def fetch_paid(self, job: ClaimedJob, engine: EngineById, deadline: Deadline) -> GeneratedAudio | None:
        """The audio of the generation named on the row, or None when there is none (or it is gone:
        then the id is forgotten, counted, and the caller may pay once)."""
        if job.generation_id is None:
            return None
        log.info("fetching generation %s… paid by an earlier attempt; no new POST", job.generation_id[:12])
        try:
            return self.wait(engine, job.generation_id, job.generation_model or "", deadline)
        except GenerationGone as exc:
            log.warning("the paid generation is gone (%s); forgetting it and paying once more", exc.detail)
            self.store.forget_generation(job, job.generation_id)  # StaleLease: another attempt owns it
            return None

    def pay_and_fetch(
        self, job: ClaimedJob, engine: EngineById, request: GenerationRequest, deadline: Deadline
    ) -> GeneratedAudio:
        generation_id = engine.submit(request, deadline)
        self._record(job, generation_id, request.model)
        try:
            # Just started: nothing is ready before one interval (a resumed wait asks at once).
            first = engine.poll_interval_s
            return self.wait(engine, generation_id, request.model, deadline, first_after_s=first)
        except GenerationGone as exc:
            # Just paid for and already unknown: the provider's fault; retrying the fetch later is
            # all that is left (the id stays on the row).
            lost = "The audio service lost a generation it had just accepted"
            raise TransientError(lost, detail=exc.detail) from None

    def wait(
        self,
        engine: EngineById,
        generation_id: str,
        model: str,
        deadline: Deadline,
        *,
        first_after_s: float = 0.0,
    ) -> GeneratedAudio:
        """Poll until the audio is there; DeadlineExceeded leaves the id for the next attempt."""
        if first_after_s:
            self.sleep(min(first_after_s, deadline.remaining()))
        while True:
            audio = engine.fetch(generation_id, model, deadline)
            if audio is not None:
                return audio
            left = deadline.check("waiting for the generation", need_s=engine.poll_interval_s)
            self.sleep(min(engine.poll_interval_s, left))

    def _record(self, job: ClaimedJob, generation_id: str, model: str) -> None:
        """Paid for: the id goes to the row before anyone waits. A write that fails does not stop
        the attempt: it still fetches and stores the audio (a later attempt reuses stored files)."""
        try:
            self.store.record_generation(job, generation_id, model)
        except (StaleLease, DatabaseUnavailable) as exc:
            log.warning(
                "generation id %s… not recorded (%s); storing its audio anyway", generation_id[:12], exc
            )
