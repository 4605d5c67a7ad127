"""The jobs store: calls the state functions in SQL over PostgREST RPC (sona.store.rpc) and returns
typed rows.

Every transition lives in SQL (supabase/schemas/30_state_machine.sql); this module only names them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel

from sona.config import Settings
from sona.deadline import Deadline
from sona.errors import Cancelled, DatabaseUnavailable, ServiceOutage, StaleLease, StoreError, TransientError
from sona.messages import musician_message
from sona.models import JobStage
from sona.outcomes import OutcomeClass
from sona.store.rpc import GatewayFailure, RpcClient, RpcError, Unreachable
from sona.supabase_keys import request_headers

if TYPE_CHECKING:
    # Imported where a row comes back: a cold worker's first claim usually finds none (a duplicate
    # or finished job), and defining the rows' models cost its answer about 5 ms (sona/rows.py).
    from sona.rows import ClaimedJob, Job, Output

# PostgREST codes (SQLSTATEs and its own PGRST codes) that mean "not now" rather than "never":
# connection failures, insufficient resources, the server shutting down, PostgREST unable to reach
# the database, and a statement timeout (57014, which PostgREST answers with a 500).
_UNAVAILABLE_PREFIXES = ("08", "53", "57P", "57014", "PGRST000", "PGRST001", "PGRST002", "PGRST003")

# advance_stage's answer when the owner cancelled the job (supabase/schemas/30_state_machine.sql).
CANCELLED_SQLSTATE = "SQ003"

# How long one request's claim keeps retrying when the database is briefly away.
CLAIM_BUDGET_S = 10.0

# Hours one fold counts at most: a day of backlog per call, so a reclaim stays short; the scheduler's
# next calls catch up on the rest (an hour that is not folded is still counted, only slower).
FOLD_HOURS = 24


# The answers' models are built on first use (defer_build): the worker's cold start imports this
# module for the claim and reads none of them.
class DueJob(BaseModel, defer_build=True):
    """A job the reclaim stamped for dispatch: its attempts so far and this dispatch's round, which
    name its task."""

    job_id: uuid.UUID
    attempt: int
    dispatch_round: int


class Reclaimed(BaseModel, defer_build=True):
    """What one reclaim did: how many expired leases it released and jobs it failed, and the jobs
    due for dispatch now. Only the dispatches come as rows, since only they are acted on (issue 34:
    10,000 released rows cost more to send and validate than to release)."""

    released: int
    failed: int
    dispatch: list[DueJob]


class Garbage(BaseModel, defer_build=True):
    id: int
    name: str


class Pause(BaseModel, defer_build=True):
    """What pause_service did: the open pause (created by this call, or already there) and
    whether this job went back to wait for it."""

    pause_id: int
    pause_created: bool
    paused_until: datetime
    released: bool
    released_status: str | None = None  # the status the released job waits in (pending or queued)


def _unavailable(code: str | None) -> bool:
    # No code: the API gateway's own answer below 500, e.g. "Invalid API key": not an outage.
    return code is not None and code.startswith(_UNAVAILABLE_PREFIXES)


class JobsStore:
    def __init__(self, settings: Settings, *, timeout_s: float = 10.0) -> None:
        headers = request_headers(settings.supabase_service_role_key.get_secret_value())
        self._settings = settings
        self._client = RpcClient(settings.supabase_url, settings.jobs_schema, headers, timeout_s)

    def _call(self, name: str, params: dict[str, Any]) -> Any:
        with _translated_errors(name):
            return self._client.call(name, params)

    def _rpc(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """A state function's rows (it returns a set of rows)."""
        return cast(list[dict[str, Any]], self._call(name, params) or [])

    def claim(
        self, job_id: uuid.UUID, claim_id: uuid.UUID, deadline: Deadline | None = None
    ) -> ClaimedJob | None:
        """Claim a pending job for this invocation; None when it is a duplicate or finished.

        The claim id (made once per request) becomes the lease token, so a retry after a lost
        answer gets the same lease back instead of "nothing to claim"."""
        settings = self._settings
        params = {
            "p_job_id": str(job_id),
            "p_claim_id": str(claim_id),
            "p_lease_seconds": settings.lease_seconds,
            "p_max_attempts": settings.max_attempts,
        }
        budget = deadline or Deadline(CLAIM_BUDGET_S)

        def claim_once() -> list[dict[str, Any]]:
            return self._rpc("claim_job", params)

        try:
            rows = claim_once()
        except TransientError as failure:
            # The retry policy (and tenacity) is imported only when the first try fails: a cold
            # worker's first answer is a claim, which almost always succeeds at once.
            from sona.retrying import going_on_from, retrying, worth_retrying

            if not worth_retrying(failure):
                raise
            policy = retrying(
                "claim",
                max_retries=settings.max_retries,
                base_delay_s=settings.internal_retry_delay_s,
                deadline=budget,
            )
            rows = going_on_from(failure, claim_once, policy)
        if not rows:
            return None
        from sona.rows import ClaimedJob

        return ClaimedJob.model_validate(rows[0])

    def complete(self, job: ClaimedJob, output: Output, *, timings_ms: dict[str, int] | None = None) -> Job:
        """Complete the job with its output; the attempt's row keeps its step timings (same call)."""
        rows = self._rpc(
            "complete_job",
            {
                "p_job_id": str(job.id),
                "p_lease_token": str(job.lease_token),
                "p_wav_url": output.wav_url,
                "p_mp3_url": output.mp3_url,
                "p_audio": output.audio.model_dump(mode="json"),
                "p_timings_ms": timings_ms,
                "p_master_path": output.master_path,
                "p_preview_path": output.preview_path,
                "p_filename": output.filename,
                "p_enhanced_prompt": output.enhanced_prompt,
            },
        )
        return self._fenced(rows, job, "complete")

    def advance(self, job: ClaimedJob, stage: JobStage) -> Job:
        """Move the job's progress stage; fenced like complete (StaleLease when the lease is gone,
        Cancelled when its owner cancelled the job)."""
        rows = self._rpc(
            "advance_stage",
            {"p_job_id": str(job.id), "p_lease_token": str(job.lease_token), "p_stage": stage.value},
        )
        return self._fenced(rows, job, f"stage {stage.value}")

    def record_generation(self, job: ClaimedJob, generation_id: str, model: str) -> Job:
        """Write the paid generation's id to the row before waiting for its audio (fenced)."""
        rows = self._rpc(
            "record_generation",
            {
                "p_job_id": str(job.id),
                "p_lease_token": str(job.lease_token),
                "p_generation_id": generation_id,
                "p_model": model,
            },
        )
        return self._fenced(rows, job, "generation id")

    def forget_generation(self, job: ClaimedJob, generation_id: str) -> Job:
        """The provider no longer knows the id: clear it (counted on the row), so one new payment
        may follow (fenced)."""
        rows = self._rpc(
            "forget_generation",
            {
                "p_job_id": str(job.id),
                "p_lease_token": str(job.lease_token),
                "p_generation_id": generation_id,
            },
        )
        return self._fenced(rows, job, "forgotten generation")

    def generation_stats(self, window_hours: int) -> dict[str, Any]:
        """Paid generations per model (completed, and ids lost to expiry) for pricing in credits."""
        return self._figures("generation_stats", window_hours)

    def fail(
        self,
        job: ClaimedJob,
        *,
        message: str,
        retryable: bool,
        outcome_class: OutcomeClass | None = None,
        timings_ms: dict[str, int] | None = None,
        detail: str | None = None,
    ) -> Job:
        """Fail the job, or release it for a retry with backoff when retryable and attempts remain.
        The row gets `message` (what the musician reads); the attempt's row keeps `detail` (what
        went wrong, the provider's words included; `message` when None), the class of the failure
        and its step timings (same statement)."""
        rows = self._rpc(
            "fail_job",
            {
                "p_job_id": str(job.id),
                "p_lease_token": str(job.lease_token),
                "p_error": message,
                "p_retryable": retryable,
                "p_max_attempts": self._settings.max_attempts,
                "p_base_delay_ms": self._settings.retry_delay_ms,
                "p_max_delay_ms": self._settings.retry_backoff_cap_ms,
                "p_outcome_class": outcome_class,
                "p_timings_ms": timings_ms,
                "p_detail": detail,
            },
        )
        return self._fenced(rows, job, "fail")

    def pause(self, job: ClaimedJob, outage: ServiceOutage) -> Pause:
        """Pause the service for an account-level outage (one open pause, however many callers)
        and release the job without using up its attempt (fenced by the lease)."""
        rows = self._rpc(
            "pause_service",
            {
                "p_job_id": str(job.id),
                "p_lease_token": str(job.lease_token),
                "p_code": outage.code,
                "p_reason": outage.detail or outage.code,
                "p_message": musician_message(outage),
                "p_seconds": None if outage.retry_after_s is None else max(1, round(outage.retry_after_s)),
            },
        )
        return Pause.model_validate(rows[0])

    def spend_stats(self, window_hours: int) -> dict[str, Any]:
        return self._figures("spend_stats", window_hours)

    def token_stats(self, window_hours: int) -> dict[str, Any]:
        """The plug-in's tokens charged and refunded, and jobs whose charge was not found."""
        return self._figures("token_stats", window_hours)

    def reclaim(self) -> Reclaimed:
        """Expire lost leases and pick the jobs due for dispatch (single-flight in SQL)."""
        answer = self._call(
            "reclaim_and_dispatch",
            {
                "p_max_attempts": self._settings.max_attempts,
                "p_grace_seconds": self._settings.reclaim_grace_s,
                "p_limit": self._settings.reclaim_limit,
                "p_base_delay_ms": self._settings.retry_delay_ms,
                "p_max_delay_ms": self._settings.retry_backoff_cap_ms,
            },
        )
        return Reclaimed.model_validate(answer)

    def files_to_delete(self, limit: int) -> list[Garbage]:
        """Object names whose rows no longer point at them (retention; docs/plugin-client.md), oldest
        first."""
        rows = self._rpc("sona_storage_garbage_due", {"p_limit": limit})
        return [Garbage.model_validate(r) for r in rows]

    def files_deleted(self, ids: list[int]) -> int:
        return int(self._call("sona_storage_garbage_done", {"p_ids": ids}) or 0)

    def stats(self, window_hours: int) -> dict[str, Any]:
        return self._figures("job_stats", window_hours)

    def fold_stats(self, max_hours: int = FOLD_HOURS) -> int:
        """Count the settled hours once, so job_stats() reads them instead of their rows
        (supabase/schemas/40_stats.sql); how many hours were folded."""
        return int(self._call("sona_fold_job_stats", {"p_limit": max_hours}) or 0)

    def _figures(self, name: str, window_hours: int) -> dict[str, Any]:
        """A figures function of the window: one JSON object (not a set of rows like the others)."""
        return cast(dict[str, Any], self._call(name, {"p_window_hours": window_hours}) or {})

    @staticmethod
    def _fenced(rows: list[dict[str, Any]], job: ClaimedJob, verb: str) -> Job:
        if not rows:
            raise StaleLease(
                f"Dropped the {verb} of job {job.id}: its lease was reclaimed by another attempt"
            )
        from sona.rows import Job

        return Job.model_validate(rows[0])


@contextmanager
def _translated_errors(name: str) -> Iterator[None]:
    """PostgREST and network errors become the project's own kinds (by code, not by text)."""
    try:
        yield
    except RpcError as exc:
        if exc.code == CANCELLED_SQLSTATE:
            raise Cancelled("The job was cancelled; nothing more is paid for it.", detail=name) from None
        if _unavailable(exc.code):
            raise DatabaseUnavailable(
                "The job database is unavailable", detail=f"{name}: {exc.code}"
            ) from None
        raise StoreError(
            "The job database rejected a request",
            detail=f"{name}: {exc.code} {exc.message}",
            says="unexpected",
        ) from None
    except GatewayFailure as exc:
        raise DatabaseUnavailable("The job database is unavailable", detail=f"{name}: {exc}") from None
    except Unreachable as exc:
        raise DatabaseUnavailable("The job database is unavailable", detail=str(exc)) from None
