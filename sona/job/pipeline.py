"""One claimed job under its deadline: generate, encode, upload, complete. Every failure is
classified (permanent or transient) and every terminal write is fenced by the claim's lease token."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import copy_context
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

from sona.audio.input_audio import inspect
from sona.audio.master import Master, Preview, encode_preview, make_master, read_wav
from sona.audio.peaks import waveform_peaks
from sona.config import Settings
from sona.deadline import Deadline
from sona.engines.base import EngineById, Engines, GenerationRequest
from sona.errors import (
    Cancelled,
    DatabaseUnavailable,
    DeadlineExceeded,
    PermanentError,
    ServiceOutage,
    SonaError,
    StaleLease,
)
from sona.job.generations import ById
from sona.job.modes import JobPlan, plan_job
from sona.messages import musician_message
from sona.models import CLAIMABLE, GeneratedAudio, JobStage
from sona.outcomes import OutcomeClass, outcome_class
from sona.retrying import retrying
from sona.rows import AudioInfo, ClaimedJob, Job, Output
from sona.store.storage import StoredOutput, attempt_stamp, object_path

log = logging.getLogger(__name__)
T = TypeVar("T")

Outcome = Literal["completed", "failed", "retrying", "stale", "interrupted", "paused", "cancelled"]
# The stable `code` of the one ERROR line per pause (the deploy's log-based metric counts it).
PAUSE_LOG_CODE = "sona_service_paused"
# The log line that ends every attempt carries this as jsonPayload.event.
ATTEMPT_EVENT = "sona_attempt"


class PauseRecord(Protocol):
    pause_created: bool
    paused_until: datetime
    released: bool
    released_status: str | None


class Store(Protocol):
    def advance(self, job: ClaimedJob, stage: JobStage) -> Job: ...
    def complete(self, job: ClaimedJob, output: Output, *, timings_ms: dict[str, int]) -> Job: ...
    def fail(
        self,
        job: ClaimedJob,
        *,
        message: str,
        retryable: bool,
        outcome_class: OutcomeClass,
        timings_ms: dict[str, int],
        detail: str | None = None,
    ) -> Job: ...
    def pause(self, job: ClaimedJob, outage: ServiceOutage) -> PauseRecord: ...
    def record_generation(self, job: ClaimedJob, generation_id: str, model: str) -> Job: ...
    def forget_generation(self, job: ClaimedJob, generation_id: str) -> Job: ...


class Storage(Protocol):
    def ensure_bucket(self) -> None: ...
    def upload(
        self,
        path: str,
        data: bytes | bytearray,
        ext: str,
        deadline: Deadline,
        metadata: dict[str, Any] | None = None,
    ) -> str: ...
    def find_output(self, job_id: object) -> StoredOutput | None: ...
    def read_input(self, name: str, deadline: Deadline, max_bytes: int) -> bytes: ...


@dataclass
class Result:
    job_id: str
    attempt: int
    outcome: Outcome
    status: str | None = None
    error: str | None = None
    timings_ms: dict[str, int] = field(default_factory=dict)
    retry_at: datetime | None = None  # when a released job may run again
    outcome_class: OutcomeClass | None = None  # why the attempt did not complete
    queue_wait_ms: int | None = None  # insert to the first attempt's start (first attempts only)

    def as_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "outcome": self.outcome,
            "attempt": self.attempt,
            "status": self.status,
            "error": self.error,
            "timings_ms": self.timings_ms,
        }


@dataclass
class Pipeline:
    settings: Settings
    store: Store
    engines: Engines  # by model name (sona/services.py)
    storage: Storage
    ffmpeg: str

    @property
    def by_id(self) -> ById:
        return ById(self.store)

    def run(self, job: ClaimedJob, deadline: Deadline, timings: dict[str, int] | None = None) -> Result:
        """timings: steps measured before the pipeline (the claim), kept with the attempt's own."""
        result = Result(str(job.id), job.attempts, "completed", timings_ms=dict(timings or {}))
        result.queue_wait_ms = _queue_wait_ms(job)
        try:
            with deadline.applies():  # bucket check, listing and the database end by it too
                row = self._produce(job, deadline, result.timings_ms)
            result.status = row.status
        except Cancelled as exc:  # before StaleLease, which it is a case of
            log.info("%s", exc)
            result.outcome, result.status, result.error = "cancelled", "cancelled", exc.public_message
        except StaleLease as exc:
            self._stale(result, exc)
        except ServiceOutage as exc:
            result.outcome_class = "account"
            self._pause(job, result, exc)
        except DatabaseUnavailable as exc:
            # The row keeps its lease; when it expires, reclaim_jobs runs the job again.
            log.error("database unavailable, leaving the job to reclaim: %s", exc)
            result.outcome, result.error = "interrupted", exc.public_message
            result.outcome_class = "database"
        except SonaError as exc:
            self._fail(job, result, exc, exc.retryable, str(exc), deadline)
        except Exception as exc:
            log.exception("unexpected error")
            self._fail(job, result, exc, True, f"unexpected error: {type(exc).__name__}", deadline)
        result.timings_ms["total"] = round(deadline.elapsed() * 1000)
        _log_attempt(result)
        return result

    def _produce(self, job: ClaimedJob, deadline: Deadline, timings: dict[str, int]) -> Job:
        plan = plan_job(job, self.settings)  # what the row asks for; bad input fails before any payment
        request = plan.request
        # Storage must be usable before anything is paid for (checked once per instance).
        _timed(timings, "bucket", self.storage.ensure_bucket)
        stored = self._earlier_output(job, timings)
        if stored is not None:
            files = stored
        elif job.reuse_only and job.generation_id is None:
            # Every paid attempt is spent and none stored its files: fail, never pay again.
            raise self._out_of_attempts()
        else:
            files = self._generate_and_store(job, plan, request, deadline, timings)
        output = Output(
            files.wav_url,
            files.mp3_url,
            AudioInfo.model_validate(files.audio),
            master_path=files.wav_path,
            preview_path=files.mp3_path,
            filename=plan.filename,
            enhanced_prompt=plan.prompt,
        )
        return _timed(
            timings,
            "complete",
            lambda: self._with_retries(
                "complete",
                deadline,
                lambda: self.store.complete(job, output, timings_ms=_so_far(timings, deadline)),
            ),
        )

    def _earlier_output(self, job: ClaimedJob, timings: dict[str, int]) -> StoredOutput | None:
        """A retry first looks for files an earlier attempt stored before it could complete the
        row (the database was down, or the process died): those were already paid for."""
        if job.attempts <= 1 and not job.reuse_only:
            return None
        found = _timed(timings, "find_output", lambda: self.storage.find_output(job.id))
        if found is not None:
            log.info("reusing the files an earlier attempt stored; no new generation")
        return found

    def _generate_and_store(
        self,
        job: ClaimedJob,
        plan: JobPlan,
        request: GenerationRequest,
        deadline: Deadline,
        timings: dict[str, int],
    ) -> StoredOutput:
        generated = self._generate(job, plan, request, deadline, timings)
        model, seed, audio = generated.model, generated.seed, generated.data
        del generated
        with self._progress_beside(job, timings) as progress:
            progress(JobStage.ENCODING)
            deadline.check("encode")
            master = _timed(
                timings, "master", partial(make_master, audio, request.duration, self.ffmpeg, deadline)
            )
            del audio  # the provider's copy is not needed once the master is cut: 10 MB less to hold
            return self._encode_and_store(job, master, model, seed, deadline, timings, progress)

    def _encode_and_store(
        self,
        job: ClaimedJob,
        master: Master,
        model: str,
        seed: int | None,
        deadline: Deadline,
        timings: dict[str, int],
        progress: Callable[[JobStage], None],
    ) -> StoredOutput:
        settings = self.settings
        stamp = attempt_stamp()
        wav_path = object_path(settings.storage_path_prefix, job.id, stamp, "wav")
        mp3_path = object_path(settings.storage_path_prefix, job.id, stamp, "mp3")
        peaks_path = object_path(settings.storage_path_prefix, job.id, stamp, "json")
        # The WAV upload, then the peaks (read from the master in memory) and their upload, overlap
        # the MP3 encode: the encode is the only real work left.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload") as pool:
            started = time.monotonic()
            upload_wav = partial(self.storage.upload, wav_path, master.wav, "wav", deadline)
            wav_future = pool.submit(_timed, timings, "upload_wav", upload_wav)
            normalize = settings.preview_normalize
            peaks_future = pool.submit(self._store_peaks, master, peaks_path, deadline, timings)
            preview = _timed(
                timings,
                "encode_mp3",
                lambda: encode_preview(
                    master.wav, settings.mp3_bitrate, self.ffmpeg, deadline, normalize=normalize
                ),
            )
            timings.update(preview.timings_ms)
            mp3 = preview.mp3
            progress(JobStage.UPLOADING)
            wav_url = wav_future.result()
            info = _audio_info(master, preview, settings, model, seed, peaks_future.result())
            # The MP3 goes last and carries the audio info: its presence marks a complete output.
            metadata = {"sona_audio": info.model_dump(mode="json")}
            mp3_url = _timed(
                timings, "upload_mp3", lambda: self.storage.upload(mp3_path, mp3, "mp3", deadline, metadata)
            )
            timings["upload"] = round((time.monotonic() - started) * 1000)
        log.info("stored %s and %s", wav_path, mp3_path)
        return StoredOutput(wav_url, mp3_url, info.model_dump(mode="json"), wav_path, mp3_path)

    def _generate(
        self,
        job: ClaimedJob,
        plan: JobPlan,
        request: GenerationRequest,
        deadline: Deadline,
        timings: dict[str, int],
    ) -> GeneratedAudio:
        """The audio: fetched by the id on the row when an earlier attempt paid for it, else paid
        for once by the engine the plan names."""
        paid_engine = self._engine_of_paid(job)
        if paid_engine is not None:
            self._stage(job, JobStage.GENERATING, timings)
            audio = _timed(timings, "fetch_paid", lambda: self.by_id.fetch_paid(job, paid_engine, deadline))
            if audio is not None:
                return audio
        if job.reuse_only:  # a finishing attempt never pays
            raise self._out_of_attempts()
        if request.input_object is not None:
            request = self._with_input(plan, request, request.input_object, deadline, timings)
        # The last moment a reclaimed lease or a cancellation can save the payment: this write is
        # fenced by the lease (StaleLease, or Cancelled when the owner cancelled the job).
        self._stage(job, JobStage.GENERATING, timings, fence=True)
        log.info(
            "generating %d s with %s (%s, %d steps)",
            request.duration,
            request.model,
            request.kind,
            request.steps,
        )
        engine = self.engines[request.model]
        if isinstance(engine, EngineById):
            return _timed(
                timings, "generate", lambda: self.by_id.pay_and_fetch(job, engine, request, deadline)
            )
        return _timed(timings, "generate", lambda: engine.generate(request, deadline))

    def _out_of_attempts(self) -> PermanentError:
        attempts = self.settings.max_attempts
        return PermanentError(
            f"The job timed out after {attempts} attempts.",
            detail="reuse only: no stored output and no generation to fetch",
            says="out_of_attempts",
            facts={"attempts": attempts},
        )

    def _engine_of_paid(self, job: ClaimedJob) -> EngineById | None:
        """The engine that answers the generation named on the row (whatever the settings say now)."""
        if job.generation_id is None or job.generation_model is None:
            return None
        engine = self.engines.get(job.generation_model)
        return engine if isinstance(engine, EngineById) else None

    def _with_input(
        self,
        plan: JobPlan,
        request: GenerationRequest,
        name: str,
        deadline: Deadline,
        timings: dict[str, int],
    ) -> GenerationRequest:
        """Audio-to-audio: the input is read and checked (size, format, length) before the provider
        is called, so a missing or unusable file fails the job without paying for anything."""
        limits = plan.limits
        data = _timed(
            timings, "read_input", lambda: self.storage.read_input(name, deadline, limits.max_input_bytes)
        )
        source = _timed(
            timings,
            "check_input",
            lambda: inspect(
                data, self.ffmpeg, deadline, max_seconds=limits.max_input_s, max_bytes=limits.max_input_bytes
            ),
        )
        log.info("input %s: %s, %.1f s, %d bytes", name, source.format, source.seconds, len(source.data))
        return request.with_source(source)

    def _stage(
        self, job: ClaimedJob, stage: JobStage, timings: dict[str, int], *, fence: bool = False
    ) -> None:
        """Progress for the plug-in. Only the write before generating is a fence: it is also the
        worker's record that a provider call is being made (refunds and cancels read it), so the
        call waits for it. Once the audio is paid for, a stale worker still stores it (the next
        attempt reuses stored files), and a database too busy for a progress write is no reason to
        drop the job."""
        started = time.monotonic()
        try:
            self.store.advance(job, stage)
        except StaleLease:
            if fence:
                raise
            log.warning("stage %s refused: the lease was reclaimed; storing the paid audio anyway", stage)
        except DatabaseUnavailable as exc:
            if fence:
                raise
            log.warning("stage %s not recorded: %s", stage, exc)
        finally:
            spent = round((time.monotonic() - started) * 1000)
            timings["stages"] = timings.get("stages", 0) + spent
            timings[f"stage_{stage.value}"] = spent

    @contextmanager
    def _progress_beside(
        self, job: ClaimedJob, timings: dict[str, int]
    ) -> Iterator[Callable[[JobStage], None]]:
        """The progress writes after payment are no fence: each goes out beside the work, one at a
        time and in order, on a thread of its own in this thread's context (the deadline and the
        job's log fields). Leaving the block waits for them, so the row says encoding, then
        uploading, before it is completed; and an unexpected error in one ends the attempt as it
        did when the write was made inline (the refusals _stage expects are logged there)."""
        written: list[Future[None]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress") as pool:
            yield lambda stage: written.append(
                pool.submit(copy_context().run, self._stage, job, stage, timings)
            )
        for write in written:
            write.result()

    def _store_peaks(
        self, master: Master, path: str, deadline: Deadline, timings: dict[str, int]
    ) -> str | None:
        """The waveform peaks file's URL, or None when Storage refuses it: a drawing aid is never a
        reason to fail a paid job (a bucket made before peaks existed may allow audio types only)."""
        started = time.monotonic()
        peaks = waveform_peaks(read_wav(master.wav))
        timings["peaks"] = round((time.monotonic() - started) * 1000)
        try:
            return _timed(
                timings,
                "upload_peaks",
                lambda: self.storage.upload(path, peaks.model_dump_json().encode(), "json", deadline),
            )
        except PermanentError as exc:
            log.warning("waveform peaks not stored (does the bucket allow application/json?): %s", exc)
            return None

    def _with_retries(self, what: str, deadline: Deadline, write: Callable[[], T]) -> T:
        """The final write is fenced, so retrying it when the database is briefly away is safe."""
        policy = retrying(
            what,
            max_retries=self.settings.max_retries,
            base_delay_s=self.settings.internal_retry_delay_s,
            deadline=deadline,
        )
        return policy(write)

    def _fail(
        self,
        job: ClaimedJob,
        result: Result,
        error: BaseException,
        retryable: bool,
        detail: str,
        deadline: Deadline,
    ) -> None:
        """The row gets the musician's message for the error's kind (sona/messages.py); the
        attempt's record and this log line get `detail`, the provider's own words included."""
        kind = result.outcome_class = outcome_class(error)
        message = musician_message(error)
        log.warning("attempt failed (%s, %s): %s", "transient" if retryable else "permanent", kind, detail)
        timings = _so_far(result.timings_ms, deadline)
        # The job's budget may be spent; recording its end gets the margin kept for exactly this.
        margin = Deadline(self.settings.deadline_margin_ms / 1000)
        try:
            with margin.applies():
                row = self._with_retries(
                    "fail",
                    margin,
                    lambda: self.store.fail(
                        job,
                        message=message,
                        retryable=retryable,
                        outcome_class=kind,
                        timings_ms=timings,
                        detail=detail,
                    ),
                )
        except StaleLease as exc:
            self._stale(result, exc)
            return
        except (DatabaseUnavailable, DeadlineExceeded) as exc:
            log.error("could not record the failure; the lease will expire: %s", exc)
            result.outcome, result.error = "interrupted", message
            return
        result.status = row.status
        result.outcome = "retrying" if row.status in CLAIMABLE else "failed"
        result.error = row.error_message
        result.retry_at = row.run_after

    def _pause(self, job: ClaimedJob, result: Result, outage: ServiceOutage) -> None:
        """The account or configuration is at fault: pause the service (once) and put the job back
        to wait for it, its attempt not used up. Only the call that opened the pause logs ERROR."""
        margin = Deadline(self.settings.deadline_margin_ms / 1000)
        try:
            with margin.applies():
                pause = self._with_retries("pause", margin, lambda: self.store.pause(job, outage))
        except (DatabaseUnavailable, DeadlineExceeded) as exc:
            log.error("could not record the outage; the lease will expire: %s", exc)
            result.outcome, result.error = "interrupted", outage.public_message
            return
        if pause.pause_created:
            log.error(
                "service paused until %s: %s",
                pause.paused_until.isoformat(),
                outage,
                extra={"json_fields": {"code": PAUSE_LOG_CODE, "cause": outage.code}},
            )
        else:
            log.warning("service already paused (%s): %s", outage.code, outage)
        result.outcome = "paused" if pause.released else "stale"
        result.status = pause.released_status if pause.released else None
        result.error, result.retry_at = musician_message(outage), pause.paused_until

    @staticmethod
    def _stale(result: Result, exc: StaleLease) -> Result:
        log.warning("%s", exc)
        result.outcome, result.error = "stale", exc.public_message
        return result


def _so_far(timings: dict[str, int], deadline: Deadline) -> dict[str, int]:
    """What the attempt's final write records: every step so far, and the total up to the write
    (the write's own time is known only after it, so it reaches the log line, not the row)."""
    return {**timings, "total": round(deadline.elapsed() * 1000)}


def _queue_wait_ms(job: ClaimedJob) -> int | None:
    if job.attempts != 1 or job.created_at is None or job.started_at is None:
        return None
    return max(0, round((job.started_at - job.created_at).total_seconds() * 1000))


def _log_attempt(result: Result) -> None:
    """One structured line per attempt: Cloud Logging's log-based metrics read its fields
    (sona/ops/monitoring.py names them)."""
    fields: dict[str, Any] = {
        "event": ATTEMPT_EVENT,
        "outcome": result.outcome,
        "outcome_class": result.outcome_class or "none",
        "timings_ms": result.timings_ms,
    }
    if result.queue_wait_ms is not None:
        fields["queue_wait_ms"] = result.queue_wait_ms
    log.info(
        "attempt %s in %d ms",
        result.outcome,
        result.timings_ms.get("total", 0),
        extra={"json_fields": fields},
    )


def _timed(timings: dict[str, int], name: str, step: Callable[[], T]) -> T:
    started = time.monotonic()
    try:
        return step()
    finally:
        timings[name] = round((time.monotonic() - started) * 1000)


def _audio_info(
    master: Master, preview: Preview, settings: Settings, model: str, seed: int | None, peaks_url: str | None
) -> AudioInfo:
    return AudioInfo(
        duration_s=round(master.duration_s, 4),
        sample_rate=master.sample_rate,
        channels=master.channels,
        sample_width_bytes=master.sample_width,
        wav_bytes=len(master.wav),
        mp3_bytes=len(preview.mp3),
        mp3_bitrate=settings.mp3_bitrate,
        provider_duration_s=round(master.provider_duration_s, 4),
        trimmed=master.trimmed,
        model=model,
        seed=seed,
        loudness_lufs=preview.loudness.integrated_lufs,
        true_peak_dbtp=preview.loudness.true_peak_dbtp,
        preview_gain_db=preview.gain_db,
        peaks_url=peaks_url,
    )
