"""The class of an attempt's outcome, for the operator figures: decided by the error's kind alone
(sona/errors.py), never by its text. Written to job_attempts by the call that ends the attempt."""

from __future__ import annotations

from typing import Literal

from sona.errors import (
    DatabaseUnavailable,
    DeadlineExceeded,
    PermanentError,
    ServiceOutage,
    SonaError,
    StorageFailure,
    TransientError,
)

OutcomeClass = Literal[
    "provider_permanent", "provider_transient", "storage", "timeout", "account", "database", "internal"
]

# job_stats() reads these names; the migration's check constraint lists the same set.
OUTCOME_CLASSES: tuple[OutcomeClass, ...] = (
    "provider_permanent",
    "provider_transient",
    "storage",
    "timeout",
    "account",
    "database",
    "internal",
)


def outcome_class(error: BaseException) -> OutcomeClass:
    """Most specific kind first: a timeout or an account-level outage can come from any step."""
    from sona.store.jobs import StoreError  # the store imports the pipeline's types, not this

    if isinstance(error, DeadlineExceeded):
        return "timeout"
    if isinstance(error, ServiceOutage):
        return "account"
    if isinstance(error, DatabaseUnavailable | StoreError):
        return "database"
    if isinstance(error, StorageFailure):
        return "storage"
    if isinstance(error, TransientError):
        return "provider_transient"
    if isinstance(error, PermanentError | SonaError):
        # A request the provider would refuse (bad input, moderation, audio it sent unreadable).
        return "provider_permanent"
    return "internal"
