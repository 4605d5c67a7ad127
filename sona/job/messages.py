"""What a musician reads in `error_message`: one message per outcome, chosen by the error's kind,
never by a provider's text (issue 35). The plug-in shows `error_message` as it is, so a provider's
words (a CUDA trace, a validation dump, a link) would reach the musician; they go instead to the
attempt's record (`job_attempts.error`) and the attempt's log line, where an operator finds them by
job id.

Three sources write `error_message`, and README's table "What the musician reads" lists every
message each can write (tests/test_musician_messages.py walks them all against it):
- this module, for an attempt that failed, was released for a retry or paused the service;
- our own checks of the row (BadRequest: its message names what to change, in our words);
- the SQL state functions (reclaim, cancel, quotas), for the outcomes the database decides.
"""

from __future__ import annotations

from typing import Literal

from sona.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    ServiceOutage,
    SonaError,
    StorageFailure,
    TransientError,
)

Said = Literal[
    "moderation",
    "english_only",
    "could_not_generate",
    "could_not_store",
    "temporary_problem",
    "timed_out",
    "out_of_attempts",
    "service_unavailable",
    "cancelled",
    "unexpected",
]

MESSAGES: dict[Said, str] = {
    "moderation": "The prompt was flagged by the audio service's content moderation; please rephrase it.",
    "english_only": "The audio service could not accept the prompt; prompts must be in English.",
    "could_not_generate": (
        "The audio service could not make this sound; please try again or change the prompt."
    ),
    "could_not_store": "The sound could not be stored; please try again.",
    # Transient outcomes: the job is retried, and when every attempt had one, fail_job adds
    # " (gave up after N attempts)", so these stay without a final stop.
    "temporary_problem": "The audio service had a temporary problem",
    "timed_out": "The job ran out of time",
    "unexpected": "An unexpected error occurred",
    "out_of_attempts": "The job timed out after {attempts} attempts.",
    "service_unavailable": (
        "The audio service is unavailable right now; this is not a problem with your prompt. "
        "Your job will run when the service is back."
    ),
    # cancel_job writes it (SQL); the worker only stops.
    "cancelled": "You cancelled this job.",
}


def said(error: BaseException) -> Said | None:
    """Which message an error's kind calls for; None for BadRequest, whose own words are read."""
    if isinstance(error, BadRequest):
        return None
    if isinstance(error, SonaError) and error.says is not None:
        return error.says
    if isinstance(error, Cancelled):
        return "cancelled"
    if isinstance(error, ServiceOutage):
        return "service_unavailable"
    if isinstance(error, DeadlineExceeded):
        return "timed_out"
    if isinstance(error, StorageFailure):
        return "could_not_store"
    if isinstance(error, TransientError):
        return "temporary_problem"
    if isinstance(error, SonaError):
        return "could_not_generate"
    return "unexpected"


def musician_message(error: BaseException) -> str:
    """The text written to `error_message` for this error."""
    key = said(error)
    if key is None:
        return error.public_message if isinstance(error, SonaError) else MESSAGES["unexpected"]
    facts = error.facts if isinstance(error, SonaError) else {}
    return MESSAGES[key].format(**facts)
