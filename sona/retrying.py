"""One retry policy for every remote call: transient errors only (not account-level outages),
exponential backoff with equal jitter (or the server's Retry-After), at most MAX_RETRIES retries,
and never past the job's deadline."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_any
from tenacity.stop import stop_base

from sona.deadline import Deadline
from sona.errors import ServiceOutage, TransientError

if TYPE_CHECKING:
    from sona.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# A retry needs at least this long after its sleep to be worth starting.
MIN_CALL_S = 1.0


class stop_at_deadline(stop_base):  # noqa: N801  tenacity names its stops in lower case
    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return bool(state.upcoming_sleep + MIN_CALL_S >= self.deadline.remaining())


def worth_retrying(exc: BaseException) -> bool:
    # An account-level refusal repeats at once: the job is released instead, for a later attempt.
    return isinstance(exc, TransientError) and not isinstance(exc, ServiceOutage)


def backoff_s(attempt: int, base_s: float, cap_s: float = 60.0) -> float:
    """Attempt 1 waits base/2..base, attempt 2 base..2*base, and so on (equal jitter)."""
    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


def retrying(
    what: str,
    *,
    max_retries: int,
    base_delay_s: float,
    deadline: Deadline,
    sleep: Callable[[float], None] = time.sleep,
) -> Retrying:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientError) and exc.retry_after_s is not None:
            return float(exc.retry_after_s)
        return backoff_s(state.attempt_number, base_delay_s)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        detail = getattr(exc, "detail", None) or type(exc).__name__
        log.warning(
            "%s failed (try %d: %s); retrying in %.2f s",
            what,
            state.attempt_number,
            detail,
            state.upcoming_sleep,
        )

    return Retrying(
        retry=retry_if_exception(worth_retrying),
        stop=stop_any(stop_after_attempt(max_retries + 1), stop_at_deadline(deadline)),
        wait=wait,
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )


def provider_retrying(
    what: str, settings: Settings, deadline: Deadline, sleep: Callable[[float], None] = time.sleep
) -> Retrying:
    """The policy of every call to a generation provider: MAX_RETRIES retries from RETRY_DELAY_MS."""
    return retrying(
        what,
        max_retries=settings.max_retries,
        base_delay_s=settings.retry_delay_ms / 1000,
        deadline=deadline,
        sleep=sleep,
    )


def going_on_from(failure: BaseException, call: Callable[[], T], policy: Retrying) -> T:
    """`call` under `policy`, as if the policy's first try had just raised `failure`: for a caller
    that makes its first try before importing this module (and tenacity with it, about 8 ms of a
    cold worker's first answer, which is a claim). From there the policy waits, logs, stops and
    gives up exactly as if it had made that try itself."""
    pending = [failure]

    def replayed() -> T:
        if pending:
            raise pending.pop()
        return call()

    return policy(replayed)
