"""The job's own deadline: every step gets what is left of JOB_TIMEOUT_MS minus a safety margin."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field

from sona.errors import DeadlineExceeded

# A timeout this close to the deadline is the deadline's (socket timeouts round to milliseconds).
SLACK_S = 0.05

# The deadline the outside calls on this thread must end by (see Deadline.applies).
_IN_EFFECT: ContextVar[Deadline | None] = ContextVar("sona_deadline", default=None)


def in_effect() -> Deadline | None:
    return _IN_EFFECT.get()


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
            raise self.exceeded(step)
        return left

    def exceeded(self, step: str) -> DeadlineExceeded:
        detail = f"{step}: {self.budget_s:.0f} s budget spent"
        return DeadlineExceeded("The job ran out of time", detail=detail)

    @contextmanager
    def applies(self) -> Iterator[Deadline]:
        """Outside calls made inside this block, on this thread, end by this deadline. Clients whose
        methods take no timeout (storage3) learn it here, through sona.store.bounded_http;
        sona.store.rpc reads it too."""
        token = _IN_EFFECT.set(self)
        try:
            yield self
        finally:
            _IN_EFFECT.reset(token)

    @contextmanager
    def cuts(self, sock: socket.socket | None, step: str = "reading the answer") -> Iterator[None]:
        """Shut the socket down when the deadline passes. A read timeout bounds each read, not
        their sum, so a peer trickling bytes would otherwise keep the call alive past it."""
        if sock is None:
            yield
            return
        with self.ends(lambda: _shut_down(sock), step):
            yield

    @contextmanager
    def ends(self, stop: Callable[[], None], step: str = "reading the answer") -> Iterator[None]:
        """Call stop (from another thread) if the block is still running when the deadline passes,
        and then raise DeadlineExceeded even if the block ended normally: what a read returns after
        the cut is not the answer (an SSL socket shut down this way reads on as a plain one)."""
        fired = threading.Event()

        def cut() -> None:
            fired.set()
            stop()

        timer = threading.Timer(self.remaining(), cut)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
        if fired.is_set():
            raise self.exceeded(step)


def _shut_down(sock: socket.socket) -> None:
    with suppress(OSError):  # already closed: the call has ended anyway
        sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv; close() would not
