"""The few kinds of failure the pipeline tells apart. Code branches on the kind, never on text."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sona.job.messages import Said


class SonaError(Exception):
    """Base. `public_message` says what went wrong in plain words, safe to log (no secrets), and
    `detail` what the provider or the system said: both reach the attempt's record and the log line.
    What the musician reads is chosen by the error's kind (sona/job/messages.py), or by `says` where one
    kind covers outcomes a musician acts on differently (moderation, English only); `facts` fill
    that message's blanks."""

    retryable = False

    def __init__(
        self,
        public_message: str,
        *,
        detail: str | None = None,
        says: Said | None = None,
        facts: dict[str, int] | None = None,
    ) -> None:
        super().__init__(public_message if detail is None else f"{public_message} ({detail})")
        self.public_message = public_message
        self.detail = detail
        self.says = says
        self.facts = facts or {}


class PermanentError(SonaError):
    """Retrying cannot help (bad input, moderation, no credits): fail the job now."""


class BadRequest(PermanentError):
    """The row asks for something this service cannot make, found by our own checks before anything
    is paid for. The one kind whose `public_message` the musician reads as written: it names what to
    change, in our words only (never a provider's). README's table lists every such message."""


class TransientError(SonaError):
    """May work later (rate limit, 5xx, network): retry within the deadline, then release."""

    retryable = True

    def __init__(
        self,
        public_message: str,
        *,
        detail: str | None = None,
        retry_after_s: float | None = None,
        says: Said | None = None,
    ) -> None:
        super().__init__(public_message, detail=detail, says=says)
        self.retry_after_s = retry_after_s


class ServiceOutage(TransientError):
    """The account or the configuration is wrong, not the job: a rejected or rotated key, no credits,
    the provider's edge refusing us, Storage refusing the key or the bucket. The service pauses and
    the job is released without using up its attempt; the message says the service, not the
    request, is at fault. `code` is stable (operators alert on it); `retry_after_s`, when known,
    is how long the pause lasts (else the configured pause_seconds)."""

    def __init__(
        self,
        public_message: str,
        *,
        code: str = "service_outage",
        detail: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(public_message, detail=detail, retry_after_s=retry_after_s)
        self.code = code


class StaleLease(SonaError):
    """A fenced write matched no row: the lease was reclaimed and this worker's result is dropped."""


class Cancelled(StaleLease):
    """The job's owner cancelled it: its lease is gone like a reclaimed one's, so every fenced write
    matches nothing; before paying, the worker stops and reports the cancellation."""


class GenerationGone(SonaError):
    """The provider no longer knows a paid generation's id (expired or unknown: 404
    generation_not_found). The only case in which a job with an id on its row pays again."""


class DeadlineExceeded(TransientError):
    """The job's own budget ran out before the platform's timeout."""


class DatabaseUnavailable(TransientError):
    """The jobs store could not be reached: answer 503 and leave the row as it was."""


class StorageFailure(SonaError):
    """Mixin: Supabase Storage, not the provider, failed (counted apart in the operator figures)."""


class StorageUnavailable(StorageFailure, TransientError):
    """Storage answered 5xx, 429 or 408, or could not be reached."""


class StorageRefused(StorageFailure, PermanentError):
    """Storage refused the file for good (too large, a bad key)."""


class FfmpegMissing(RuntimeError):
    """No ffmpeg anywhere: a startup error, so no job is claimed and then lost mid-way."""
