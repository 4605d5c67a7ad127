"""The pipeline in the middle, with in-memory adapters: what each kind of failure does to the job."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sona.audio.ffmpeg import find_ffmpeg
from sona.catalog import MODELS
from sona.deadline import Deadline
from sona.engines.base import GenerationRequest
from sona.errors import (
    BadRequest,
    Cancelled,
    DatabaseUnavailable,
    DeadlineExceeded,
    GenerationGone,
    PermanentError,
    ServiceOutage,
    StaleLease,
    StorageRefused,
    StorageUnavailable,
    StoreError,
    TransientError,
)
from sona.job.pipeline import ATTEMPT_EVENT, Pipeline
from sona.models import GeneratedAudio, JobStage, JobStatus
from sona.outcomes import OutcomeClass, outcome_class
from sona.rows import AudioInfo, ClaimedJob, Job, Output
from sona.store.storage import StoredOutput
from tests.support import AUDIO_INFO, make_settings, wav_bytes


@dataclass
class FakePause:
    pause_created: bool
    paused_until: datetime
    released: bool = True
    released_status: str | None = "pending"


@dataclass
class FakeStore:
    fail_complete: Exception | None = None
    fail_fail: Exception | None = None
    writes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    cancelled: bool = False  # the owner cancelled the job after it was claimed
    pause_exists: bool = False

    def pause(self, job: ClaimedJob, outage: ServiceOutage) -> FakePause:
        self.writes.append(("pause", {"code": outage.code, "message": outage.public_message}))
        created, self.pause_exists = not self.pause_exists, True
        return FakePause(created, datetime.now(UTC) + timedelta(seconds=300))

    stale_from: JobStage | None = None  # the lease is reclaimed just before this stage's write
    down_at: JobStage | None = None  # the database cannot be reached for this stage's write
    stages: list[JobStage] = field(default_factory=list)

    def advance(self, job: ClaimedJob, stage: JobStage) -> Job:
        if self.cancelled:
            raise Cancelled("The job was cancelled; nothing more is paid for it.")
        if stage == self.down_at:
            raise DatabaseUnavailable("The job database is unavailable")
        if self.stale_from is not None and _ORDER.index(stage) >= _ORDER.index(self.stale_from):
            self.fail_complete = StaleLease("reclaimed")
            raise StaleLease("reclaimed")
        self.stages.append(stage)
        return job

    # What each write recorded for the operator figures: (outcome class, timings).
    figures: list[tuple[OutcomeClass | None, dict[str, int]]] = field(default_factory=list)

    def complete(self, job: ClaimedJob, output: Output, *, timings_ms: dict[str, int]) -> Job:
        if self.fail_complete is not None:
            raise self.fail_complete
        written = {"wav_url": output.wav_url, "mp3_url": output.mp3_url, "output": output}
        self.writes.append(("complete", written))
        self.figures.append((None, timings_ms))
        return job.model_copy(update={"status": JobStatus.COMPLETED})

    def fail(
        self,
        job: ClaimedJob,
        *,
        message: str,
        retryable: bool,
        outcome_class: OutcomeClass,
        timings_ms: dict[str, int],
        detail: str | None = None,
    ) -> Job:
        if self.fail_fail is not None:
            raise self.fail_fail
        self.writes.append(("fail", {"message": message, "retryable": retryable, "detail": detail}))
        self.figures.append((outcome_class, timings_ms))
        status = JobStatus.PENDING if retryable else JobStatus.FAILED
        return job.model_copy(update={"status": status, "error_message": message})

    fail_record: Exception | None = None  # the id write fails (stale lease, database away)

    def record_generation(self, job: ClaimedJob, generation_id: str, model: str) -> Job:
        if self.fail_record is not None:
            raise self.fail_record
        self.writes.append(("record_generation", {"id": generation_id, "model": model}))
        return job

    def forget_generation(self, job: ClaimedJob, generation_id: str) -> Job:
        self.writes.append(("forget_generation", {"id": generation_id}))
        return job


_ORDER = [JobStage.GENERATING, JobStage.ENCODING, JobStage.UPLOADING]


@dataclass
class FakeProvider:
    error: Exception | None = None
    calls: int = 0

    def generate(self, request: GenerationRequest, deadline: Deadline) -> GeneratedAudio:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return GeneratedAudio(wav_bytes(request.duration + 0.5), "audio/wav", request.model, seed=7)


@dataclass
class FakeStorage:
    stored: dict[str, bytes] = field(default_factory=dict)
    earlier: StoredOutput | None = None
    error: Exception | None = None

    def ensure_bucket(self) -> None:
        if self.error is not None:
            raise self.error

    refuse_ext: str | None = None

    def upload(
        self, path: str, data: bytes, ext: str, deadline: Deadline, metadata: dict[str, Any] | None = None
    ) -> str:
        if ext == self.refuse_ext:
            raise PermanentError("The generated audio could not be stored", detail="storage 415")
        self.stored[path] = data
        return f"https://files/{path}"

    def find_output(self, job_id: object) -> StoredOutput | None:
        return self.earlier



def every_model(engine: object) -> dict[str, Any]:
    """The engines as sona/services.py hands them over (by model name), all served by one fake."""
    return dict.fromkeys(MODELS, engine)

def claimed(**fields: Any) -> ClaimedJob:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "prompt": "soft rain",
        "duration": 2,
        "quality": "low",
        "mode": "default",
        "status": JobStatus.PROCESSING,
        "attempts": 1,
        "lease_token": uuid.uuid4(),
    }
    return ClaimedJob(**{**values, **fields})


def run(
    job: ClaimedJob,
    store: FakeStore | None = None,
    provider: FakeProvider | None = None,
    storage: FakeStorage | None = None,
    *,
    ffmpeg: str | None = None,
    budget_s: float = 30,
    timings: dict[str, int] | None = None,
    **setting: Any,
) -> tuple[Any, FakeStore, FakeProvider, FakeStorage]:
    store, provider, storage = store or FakeStore(), provider or FakeProvider(), storage or FakeStorage()
    settings = make_settings(retry_delay_ms=10, **setting)
    pipeline = Pipeline(settings, store, every_model(provider), storage, ffmpeg or find_ffmpeg())
    return pipeline.run(job, Deadline(budget_s), timings), store, provider, storage


def test_a_job_is_generated_cut_stored_and_completed() -> None:
    result, store, provider, storage = run(claimed())
    assert (result.outcome, provider.calls) == ("completed", 1)
    assert sorted(p.rsplit(".", 1)[1] for p in storage.stored) == ["json", "mp3", "wav"]
    ((verb, written),) = store.writes
    assert verb == "complete"
    assert written["output"].audio.duration_s == 2.0
    assert written["output"].audio.trimmed is True
    assert written["output"].audio.seed == 7


@pytest.mark.parametrize(
    ("error", "retryable", "outcome"),
    [
        (PermanentError("The prompt was flagged"), False, "failed"),
        (TransientError("The audio service is busy"), True, "retrying"),
        (RuntimeError("a bug"), True, "retrying"),
    ],
)
def test_a_failure_is_classified_and_recorded(error: Exception, retryable: bool, outcome: str) -> None:
    result, store, _, storage = run(claimed(), provider=FakeProvider(error=error))
    assert result.outcome == outcome
    assert store.writes[-1][1]["retryable"] is retryable
    assert storage.stored == {}


def test_a_job_cancelled_after_its_claim_is_never_generated_nor_written() -> None:
    result, store, provider, storage = run(claimed(), store=FakeStore(cancelled=True))
    assert (result.outcome, result.status, provider.calls) == ("cancelled", "cancelled", 0)
    assert (store.writes, storage.stored) == ([], {})


@pytest.mark.parametrize(
    ("where", "outage"),
    [
        ("provider", ServiceOutage("no credits", code="provider_out_of_credits")),
        ("storage", ServiceOutage("key refused", code="storage_refused")),
    ],
)
def test_an_account_level_outage_pauses_instead_of_failing(where: str, outage: ServiceOutage) -> None:
    provider = FakeProvider(error=outage if where == "provider" else None)
    storage = FakeStorage(error=outage if where == "storage" else None)
    result, store, _, _ = run(claimed(), provider=provider, storage=storage)
    assert (result.outcome, result.status) == ("paused", "pending")
    assert [verb for verb, _ in store.writes] == ["pause"]  # never fail_job: no attempt used up
    assert store.writes[0][1]["code"] == outage.code


def test_only_the_call_that_opens_the_pause_logs_it_at_error_with_its_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = ServiceOutage("no credits", code="provider_out_of_credits")
    store = FakeStore()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            run(claimed(), store=store, provider=FakeProvider(error=outage))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].json_fields["code"] == "sona_service_paused"  # type: ignore[attr-defined]
    assert errors[0].json_fields["cause"] == "provider_out_of_credits"  # type: ignore[attr-defined]


def test_bad_input_fails_before_any_provider_call() -> None:
    result, store, provider, _ = run(claimed(mode="inpaint"))
    assert (result.outcome, provider.calls) == ("failed", 0)
    assert "mode is not supported" in store.writes[-1][1]["message"]


def test_unusable_storage_fails_before_paying_for_a_generation() -> None:
    result, _, provider, _ = run(claimed(), storage=FakeStorage(error=TransientError("storage down")))
    assert (result.outcome, provider.calls) == ("retrying", 0)


EARLIER = StoredOutput("https://f/a.wav", "https://f/a.mp3", AUDIO_INFO.model_dump(), "a.wav", "a.mp3")


def test_a_retry_completes_from_the_files_an_earlier_attempt_stored() -> None:
    earlier = EARLIER
    result, store, provider, _ = run(claimed(attempts=2), storage=FakeStorage(earlier=earlier))
    assert (result.outcome, provider.calls) == ("completed", 0)
    assert store.writes[-1][1]["mp3_url"] == "https://f/a.mp3"


def test_a_stale_lease_drops_the_result_without_a_failure_write() -> None:
    result, store, _, _ = run(claimed(), store=FakeStore(fail_complete=StaleLease("reclaimed")))
    assert result.outcome == "stale"
    assert store.writes == []


def test_a_database_outage_at_the_end_leaves_the_job_to_reclaim() -> None:
    store = FakeStore(fail_complete=DatabaseUnavailable("The job database is unavailable"))
    result, store, _, storage = run(claimed(), store=store)
    assert result.outcome == "interrupted"
    assert store.writes == []
    assert len(storage.stored) == 3  # the files stay for the next attempt to reuse


def test_a_finishing_attempt_completes_from_the_stored_files_without_generating() -> None:
    earlier = EARLIER
    job = claimed(attempts=4, reuse_only=True)
    result, store, provider, _ = run(job, storage=FakeStorage(earlier=earlier))
    assert (result.outcome, provider.calls) == ("completed", 0)
    assert store.writes[-1][1]["wav_url"] == "https://f/a.wav"


def test_a_finishing_attempt_without_stored_files_fails_for_good_without_generating() -> None:
    result, store, provider, storage = run(claimed(attempts=4, reuse_only=True))
    assert (result.outcome, provider.calls) == ("failed", 0)
    ((verb, written),) = store.writes
    assert (verb, written["retryable"]) == ("fail", False)
    assert written["message"] == "The job timed out after 3 attempts."
    assert storage.stored == {}


def test_an_encoder_still_running_at_the_deadline_releases_the_job(tmp_path: Path) -> None:
    stuck = tmp_path / "ffmpeg"
    stuck.write_text("#!/bin/sh\nexec sleep 60\n")
    stuck.chmod(0o755)
    started = time.monotonic()
    result, store, _, _ = run(claimed(), ffmpeg=str(stuck), budget_s=1.5)
    assert time.monotonic() - started < 3.5
    assert result.outcome == "retrying"
    written = store.writes[-1][1]
    assert (written["message"], written["retryable"]) == ("The job ran out of time", True)


def test_a_failure_write_that_outlives_the_margin_leaves_the_job_to_reclaim() -> None:
    store = FakeStore(fail_fail=DeadlineExceeded("The job ran out of time"))
    result, _, _, _ = run(claimed(), store=store, provider=FakeProvider(error=TransientError("busy")))
    assert (result.outcome, result.error) == ("interrupted", "The audio service had a temporary problem")


@dataclass
class InputStorage(FakeStorage):
    """FakeStorage with an inputs bucket."""

    inputs: dict[str, bytes] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list)

    def read_input(self, name: str, deadline: Deadline, max_bytes: int) -> bytes:
        self.reads.append(name)
        if name not in self.inputs:
            raise BadRequest("The input file was not found; upload it again.")
        return self.inputs[name]


@dataclass
class SourceProvider(FakeProvider):
    sources: list[Any] = field(default_factory=list)

    def generate(self, request: GenerationRequest, deadline: Deadline) -> GeneratedAudio:
        self.sources.append(request.source)
        return super().generate(request, deadline)


def a2a(user: uuid.UUID, path: str) -> ClaimedJob:
    return claimed(user_id=user, mode="audio-to-audio", input_path=path, strength=0.4)


def test_an_audio_to_audio_job_reads_and_checks_its_input_before_the_provider_call() -> None:
    user = uuid.uuid4()
    storage = InputStorage(inputs={f"{user}/in.wav": wav_bytes(7)})
    provider = SourceProvider()
    result, _, _, _ = run(a2a(user, f"{user}/in.wav"), provider=provider, storage=storage)
    assert result.outcome == "completed", result.error
    (source,) = provider.sources
    assert (source.format, round(source.seconds), source.data) == ("wav", 7, storage.inputs[f"{user}/in.wav"])
    assert {"read_input", "check_input"} <= set(result.timings_ms)


@pytest.mark.parametrize(
    ("stored", "message"),
    [(None, "not found"), (wav_bytes(3), "must be 6 to 190 seconds"), (b"plain text" * 40, "not MP3 or WAV")],
)
def test_an_unusable_input_fails_the_job_and_nothing_is_paid(stored: bytes | None, message: str) -> None:
    user = uuid.uuid4()
    storage = InputStorage(inputs={} if stored is None else {f"{user}/in.wav": stored})
    result, store, provider, _ = run(a2a(user, f"{user}/in.wav"), storage=storage)
    assert (result.outcome, provider.calls) == ("failed", 0)
    assert message in store.writes[-1][1]["message"]
    assert store.writes[-1][1]["retryable"] is False


def completed_audio(store: FakeStore) -> AudioInfo:
    ((verb, written),) = store.writes
    assert verb == "complete"
    audio: AudioInfo = written["output"].audio
    return audio


def test_a_job_moves_through_generating_encoding_and_uploading_in_order() -> None:
    _, store, _, _ = run(claimed())
    assert store.stages == [JobStage.GENERATING, JobStage.ENCODING, JobStage.UPLOADING]


@dataclass
class SlowProgressStore(FakeStore):
    """A database that is slow to take progress writes, and remembers every write in order."""

    def advance(self, job: ClaimedJob, stage: JobStage) -> Job:
        time.sleep(0.05)  # slower than the work beside it: a write left behind would land late
        self.writes.append(("advance", {"stage": stage}))
        return super().advance(job, stage)


def test_the_progress_writes_made_beside_the_work_all_land_before_the_completing_write() -> None:
    _, store, _, _ = run(claimed(), store=SlowProgressStore())
    assert [kind for kind, _ in store.writes] == ["advance", "advance", "advance", "complete"]
    assert store.stages == [JobStage.GENERATING, JobStage.ENCODING, JobStage.UPLOADING]


@dataclass
class BrokenProgressStore(FakeStore):
    broken_at: JobStage | None = None  # this stage's write raises an error _stage does not expect

    def advance(self, job: ClaimedJob, stage: JobStage) -> Job:
        if stage == self.broken_at:
            raise RuntimeError("a bug in the progress write")
        return super().advance(job, stage)


@pytest.mark.parametrize("stage", [JobStage.ENCODING, JobStage.UPLOADING])
def test_an_unexpected_error_in_a_progress_write_beside_the_work_is_not_lost(stage: JobStage) -> None:
    # Made on their own thread, the writes must still end the attempt on an error _stage does not
    # expect, as they did when made inline: never a silent completion over a broken write.
    result, store, provider, _ = run(claimed(), store=BrokenProgressStore(broken_at=stage))
    assert (result.outcome, result.outcome_class, provider.calls) == ("retrying", "internal", 1)
    assert [(kind, write["retryable"]) for kind, write in store.writes] == [("fail", True)]


def test_a_lease_lost_before_generating_pays_for_nothing() -> None:
    result, store, provider, storage = run(claimed(), store=FakeStore(stale_from=JobStage.GENERATING))
    assert (result.outcome, provider.calls) == ("stale", 0)
    assert (store.writes, storage.stored) == ([], {})


def test_a_provider_call_the_database_could_not_record_is_never_made() -> None:
    # The generating write is what a refund and a cancel read to know a call was made: without it
    # the call would be paid yet look unpaid, so the attempt stops and the row waits for a retry.
    result, store, provider, storage = run(claimed(), store=FakeStore(down_at=JobStage.GENERATING))
    assert (result.outcome, provider.calls) == ("interrupted", 0)
    assert (store.writes, storage.stored) == ([], {})


@pytest.mark.parametrize("stage", [JobStage.ENCODING, JobStage.UPLOADING])
def test_a_progress_write_the_database_missed_after_generating_still_completes(stage: JobStage) -> None:
    result, store, provider, _ = run(claimed(), store=FakeStore(down_at=stage))
    assert (result.outcome, provider.calls) == ("completed", 1)
    assert [kind for kind, _ in store.writes] == ["complete"]


@pytest.mark.parametrize("stage", [JobStage.ENCODING, JobStage.UPLOADING])
def test_a_lease_lost_after_generating_still_stores_the_paid_audio(stage: JobStage) -> None:
    result, _, provider, storage = run(claimed(), store=FakeStore(stale_from=stage))
    assert (result.outcome, provider.calls) == ("stale", 1)
    assert sorted(p.rsplit(".", 1)[1] for p in storage.stored) == ["json", "mp3", "wav"]


def test_the_row_gets_the_peaks_url_and_the_masters_loudness() -> None:
    _, store, _, storage = run(claimed())
    audio = completed_audio(store)
    (peaks_path,) = (p for p in storage.stored if p.endswith(".json"))
    assert audio.peaks_url == f"https://files/{peaks_path}"
    assert audio.loudness_lufs is not None and -40 < audio.loudness_lufs < 0
    assert audio.true_peak_dbtp is not None and audio.true_peak_dbtp < 0
    assert audio.preview_gain_db not in (None, 0.0)


def test_peaks_refused_by_storage_leave_the_job_completed_without_them() -> None:
    result, store, _, _ = run(claimed(), storage=FakeStorage(refuse_ext="json"))
    assert result.outcome == "completed"
    assert completed_audio(store).peaks_url is None


def test_preview_normalisation_can_be_turned_off() -> None:
    _, store, _, _ = run(claimed(), preview_normalize=False)
    audio = completed_audio(store)
    assert audio.preview_gain_db == 0.0
    assert audio.loudness_lufs is not None  # measured either way


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (PermanentError("The prompt was flagged"), "provider_permanent"),
        (TransientError("The audio service is busy"), "provider_transient"),
        (StorageUnavailable("The file storage had a temporary problem"), "storage"),
        (StorageRefused("The generated audio could not be stored"), "storage"),
        (ServiceOutage("The audio service refused our key"), "account"),
        (DeadlineExceeded("The job ran out of time"), "timeout"),
        (DatabaseUnavailable("The job database is unavailable"), "database"),
        (StoreError("The job database rejected a request"), "database"),
        (RuntimeError("a bug"), "internal"),
    ],
)
def test_an_error_is_classed_by_its_kind(error: Exception, expected: OutcomeClass) -> None:
    assert outcome_class(error) == expected


@pytest.mark.parametrize(
    ("provider_error", "storage_error", "expected"),
    [
        (PermanentError("The prompt was flagged"), None, "provider_permanent"),
        (TransientError("The audio service is busy"), None, "provider_transient"),
        (None, StorageUnavailable("The file storage is unavailable"), "storage"),
        (RuntimeError("a bug"), None, "internal"),
    ],
)
def test_the_failure_write_records_the_class_of_the_failure(
    provider_error: Exception | None, storage_error: Exception | None, expected: OutcomeClass
) -> None:
    result, store, _, _ = run(
        claimed(), provider=FakeProvider(error=provider_error), storage=FakeStorage(error=storage_error)
    )
    assert result.outcome_class == expected
    ((recorded, _),) = store.figures
    assert recorded == expected


def test_an_account_level_outage_is_classed_on_the_attempt_and_recorded_as_a_pause() -> None:
    result, store, _, _ = run(claimed(), provider=FakeProvider(error=ServiceOutage("refused our key")))
    assert (result.outcome, result.outcome_class) == ("paused", "account")
    assert [verb for verb, _ in store.writes] == ["pause"]  # not a failure: the job waits
    assert store.figures == []


def test_the_completing_write_records_every_step_timed_before_it() -> None:
    _, store, _, _ = run(claimed(), timings={"claim": 12})
    ((recorded, timings),) = store.figures
    assert recorded is None
    assert {"claim", "bucket", "generate", "master", "encode_mp3", "upload", "total"} <= set(timings)
    assert timings["claim"] == 12


def test_the_attempts_log_line_times_each_progress_write_upload_and_part_of_the_preview() -> None:
    result, _, _, _ = run(claimed())
    parts = {"stage_generating", "stage_encoding", "stage_uploading", "upload_wav", "upload_peaks",
             "upload_mp3", "peaks", "encode_ffmpeg", "gain", "complete"}  # fmt: skip
    assert parts <= set(result.timings_ms)
    each = [result.timings_ms[f"stage_{stage}"] for stage in ("generating", "encoding", "uploading")]
    assert result.timings_ms["stages"] == sum(each)


def test_the_failure_write_records_the_steps_reached_and_the_provider_call() -> None:
    _, store, _, _ = run(claimed(), provider=FakeProvider(error=TransientError("busy")))
    ((_, timings),) = store.figures
    assert {"bucket", "generate", "total"} <= set(timings)
    assert "upload" not in timings


def test_every_attempt_ends_with_one_structured_line_for_log_based_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    created = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    job = claimed(created_at=created, started_at=created + timedelta(seconds=1.5))
    with caplog.at_level("INFO", logger="sona.job.pipeline"):
        result, _, _, _ = run(job, provider=FakeProvider(error=TransientError("busy")))
    (line,) = [r for r in caplog.records if getattr(r, "json_fields", {}).get("event") == ATTEMPT_EVENT]
    fields = line.json_fields  # type: ignore[attr-defined]
    assert (fields["outcome"], fields["outcome_class"]) == ("retrying", "provider_transient")
    assert fields["timings_ms"] == result.timings_ms
    assert fields["queue_wait_ms"] == 1500


def test_only_a_first_attempt_reports_its_queue_wait(caplog: pytest.LogCaptureFixture) -> None:
    created = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    job = claimed(attempts=2, created_at=created, started_at=created + timedelta(minutes=3))
    with caplog.at_level("INFO", logger="sona.job.pipeline"):
        run(job)
    (line,) = [r for r in caplog.records if getattr(r, "json_fields", {}).get("event") == ATTEMPT_EVENT]
    assert "queue_wait_ms" not in line.json_fields  # type: ignore[attr-defined]


# -- engines that answer an id first (Stable Audio 3): the id is the payment --------------------------


@dataclass
class FakeEngineById:
    """Pays on submit; answers `polls` in-progress fetches, then the audio; `gone` ids answer 404."""

    polls: int = 0
    gone: set[str] = field(default_factory=set)
    submitted: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    poll_interval_s: float = 0.01

    def submit(self, request: GenerationRequest, deadline: Deadline) -> str:
        self.submitted.append(f"{len(self.submitted):064x}")
        return self.submitted[-1]

    def fetch(self, generation_id: str, model: str, deadline: Deadline) -> GeneratedAudio | None:
        self.fetched.append(generation_id)
        if generation_id in self.gone:
            raise GenerationGone("gone", detail="generation_not_found")
        if self.polls > 0:
            self.polls -= 1
            return None
        return GeneratedAudio(wav_bytes(2.5), "audio/wav", model or "stable-audio-3", seed=3)


def run_by_id(
    job: ClaimedJob, engine: FakeEngineById, store: FakeStore | None = None, budget_s: float = 30
) -> tuple[Any, FakeStore]:
    store = store or FakeStore()
    settings = make_settings(retry_delay_ms=10, stable_audio_model="stable-audio-3")
    engines = {**every_model(FakeProvider()), "stable-audio-3": engine}
    pipeline = Pipeline(settings, store, engines, FakeStorage(), find_ffmpeg())
    return pipeline.run(job, Deadline(budget_s)), store


def test_an_id_engine_pays_once_writes_the_id_then_waits_for_the_audio() -> None:
    engine = FakeEngineById(polls=3)
    result, store = run_by_id(claimed(), engine)
    assert (result.outcome, len(engine.submitted), len(engine.fetched)) == ("completed", 1, 4)
    assert [verb for verb, _ in store.writes] == ["record_generation", "complete"]
    assert store.writes[0][1] == {"id": engine.submitted[0], "model": "stable-audio-3"}


def test_an_attempt_that_finds_an_id_on_its_row_fetches_it_and_never_posts() -> None:
    engine = FakeEngineById()
    job = claimed(attempts=2, generation_id="a" * 64, generation_model="stable-audio-3")
    result, _ = run_by_id(job, engine)
    assert (result.outcome, engine.submitted, engine.fetched) == ("completed", [], ["a" * 64])


def test_a_finishing_attempt_fetches_the_paid_id_though_its_attempts_are_spent() -> None:
    engine = FakeEngineById()
    job = claimed(attempts=4, reuse_only=True, generation_id="b" * 64, generation_model="stable-audio-3")
    result, _ = run_by_id(job, engine)
    assert (result.outcome, engine.submitted) == ("completed", [])


def test_an_expired_id_is_forgotten_and_counted_and_is_the_only_way_to_a_new_post() -> None:
    engine = FakeEngineById(gone={"c" * 64})
    job = claimed(attempts=2, generation_id="c" * 64, generation_model="stable-audio-3")
    result, store = run_by_id(job, engine)
    assert (result.outcome, len(engine.submitted)) == ("completed", 1)
    assert [verb for verb, _ in store.writes] == ["forget_generation", "record_generation", "complete"]


def test_the_deadline_while_waiting_releases_the_job_with_its_id_kept() -> None:
    engine = FakeEngineById(polls=10**6)
    result, store = run_by_id(claimed(), engine, budget_s=1.5)
    assert (result.outcome, len(engine.submitted)) == ("retrying", 1)
    assert [verb for verb, _ in store.writes] == ["record_generation", "fail"]


@pytest.mark.parametrize("error", [StaleLease("reclaimed"), DatabaseUnavailable("down")])
def test_an_id_that_could_not_be_written_still_has_its_audio_fetched_and_stored(error: Exception) -> None:
    engine = FakeEngineById()
    result, _ = run_by_id(claimed(), engine, FakeStore(fail_record=error))
    assert (len(engine.submitted), len(engine.fetched)) == (1, 1)
    assert result.outcome == "completed"
