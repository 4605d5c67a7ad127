"""The job's own deadline: every step gets what is left of JOB_TIMEOUT_MS minus a safety margin."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sona.errors import DeadlineExceeded


@dataclass
class Deadline:
    budget_s: float
    started: float = field(default_factory=time.monotonic)

    @property
    def expires(self) -> float:
        return self.started + self.budget_s

    def remaining(self) -> float:
        return max(0.0, self.expires - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self, step: str, *, need_s: float = 0.0) -> float:
        """Raise DeadlineExceeded unless at least need_s is left; return what is left."""
        left = self.remaining()
        if left <= need_s:
            raise DeadlineExceeded(
                "The job ran out of time",
                detail=f"{step}: {self.budget_s:.0f} s budget spent",
            )
        return left
