"""What a row asks for (sona/job/modes.py): the plug-in's modes, their prompts, lengths, qualities and
models, the earlier worker's modes, and the reasons a row fails before anything is paid for.

The expected prompts are docs/plugin-client.md's table "The three modes" (the plug-in's worker,
audio-worker/src/prepare-prompt.ts at 34648b7): the musician's prompt, ". ", then the phrases."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from sona.errors import BadRequest, PermanentError
from sona.job.modes import duration_phrase, plan_job
from sona.models import JobStatus
from sona.rows import Job
from tests.support import make_settings

KEY = {"key": "A", "scale": "minor"}
LOOP = {"type": "loop", "bpm": 124, "timeSignature": "4/4", "bars": 8}
SONG = {"type": "song", "bpm": 92, "timeSignature": "4/4", "bars": 4}
TANGOFLUX = {"replicate_api_token": "r8_modes-test-token-0123"}  # a tangoflux mode needs one


def job(**fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": uuid.UUID(int=0xABCDEF),
        "user_id": uuid.uuid4(),
        "prompt": "deep warm bass groove",
        "duration": 10,
        "quality": "medium",
        "mode": "designer",
        "status": JobStatus.QUEUED,
        "created_at": datetime(2026, 1, 20, 9, 30, tzinfo=UTC),
        **fields,
    }
    return Job(**values)


def as_generate_stores(value: dict[str, Any]) -> str:
    """generate writes JSON.stringify(...) into a jsonb column: a string scalar holding JSON."""
    return json.dumps(value)


@pytest.mark.parametrize(
    ("fields", "prompt"),
    [
        ({"mode": "designer", "duration": 3}, "deep warm bass groove. very short"),
        ({"mode": "designer", "duration": 12}, "deep warm bass groove. 12 seconds"),
        (
            {"mode": "producer", "duration": 16, "musical_key": KEY, "producer_config": LOOP},
            "deep warm bass groove. 124 BPM, A minor, 4/4 time, 8 bars, 16 seconds",
        ),
        (
            {"mode": "producer", "duration": 8, "producer_config": {"bpm": 140, "bars": 1}},
            "deep warm bass groove. 140 BPM, 1 bar, 8 seconds",
        ),
        ({"mode": "producer", "duration": 30}, "deep warm bass groove. 30 seconds"),
        (
            {"mode": "creator", "duration": 120, "musical_key": KEY, "producer_config": SONG},
            "deep warm bass groove. 92 BPM, A minor, 2 minutes",
        ),
        (
            {"mode": "creator", "duration": 150, "producer_config": SONG},
            "deep warm bass groove. 92 BPM, 2:30 minutes",
        ),
        ({"mode": "creator", "duration": 60}, "deep warm bass groove. 60 seconds"),
        ({"mode": "default", "duration": 12}, "deep warm bass groove"),
        ({"mode": "text-to-audio", "duration": 12}, "deep warm bass groove"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_each_mode_sends_the_prompt_the_plugins_worker_built(fields: dict[str, Any], prompt: str) -> None:
    assert plan_job(job(**fields), make_settings()).prompt == prompt


@pytest.mark.parametrize("stored", ["object", "json string"])
def test_the_json_columns_read_the_same_as_objects_or_as_generates_json_strings(stored: str) -> None:
    key, config = (KEY, LOOP) if stored == "object" else (as_generate_stores(KEY), as_generate_stores(LOOP))
    plan = plan_job(
        job(mode="producer", duration=16, musical_key=key, producer_config=config), make_settings()
    )
    assert plan.prompt.endswith(". 124 BPM, A minor, 4/4 time, 8 bars, 16 seconds")


def test_an_unreadable_json_column_is_ignored_as_the_plugins_worker_ignored_it() -> None:
    plan = plan_job(
        job(mode="creator", duration=20, musical_key="{not json", producer_config=7), make_settings()
    )
    assert plan.prompt == "deep warm bass groove. 20 seconds"


@pytest.mark.parametrize(
    ("seconds", "phrase"),
    [
        (1, "very short"),
        (5, "very short"),
        (6, "6 seconds"),
        (60, "60 seconds"),
        (61, "1:01 minutes"),
        (180, "3 minutes"),
    ],
)
def test_durations_read_as_the_plugins_worker_wrote_them(seconds: int, phrase: str) -> None:
    assert duration_phrase(seconds) == phrase


@pytest.mark.parametrize(
    ("quality", "steps"), [("draft", 4), ("low", 4), ("standard", 6), ("medium", 6), ("high", 8)]
)
def test_the_uis_quality_names_map_to_the_tables(quality: str, steps: int) -> None:
    request = plan_job(job(quality=quality), make_settings()).request
    assert request.steps == steps


def test_a_120_second_creator_job_asks_the_provider_for_120_seconds() -> None:
    plan = plan_job(job(mode="creator", duration=120), make_settings())
    assert (plan.duration, plan.model, plan.engine) == (120, "stable-audio-2.5", "stable-audio")


@pytest.mark.parametrize("mode", ["designer", "producer", "creator"])
def test_each_plugin_mode_is_served_by_its_own_model_setting(mode: str) -> None:
    settings = make_settings(**{f"{mode}_model": "stable-audio-2"})
    assert plan_job(job(mode=mode), settings).model == "stable-audio-2"
    others = {"designer", "producer", "creator"} - {mode}
    assert {plan_job(job(mode=m), settings).model for m in others} == {"stable-audio-2.5"}


@pytest.mark.parametrize(("duration", "asked"), [(181, 181), (300, 300), (380, 380)])
def test_a_mode_served_by_stable_audio_3_takes_up_to_380_seconds(duration: int, asked: int) -> None:
    settings = make_settings(creator_model="stable-audio-3", storage_upload_limit="100MB")
    plan = plan_job(job(mode="creator", duration=duration), settings)
    assert (plan.duration, plan.model, plan.engine) == (asked, "stable-audio-3", "stable-audio-3")


@pytest.mark.parametrize(
    ("limit", "duration", "fits"),
    [("50MB", 283, True), ("50MB", 284, False), ("500MB", 380, True), ("10MB", 57, False)],
)
def test_a_clip_whose_master_the_storage_cannot_hold_fails_before_it_is_paid_for(
    limit: str, duration: int, fits: bool
) -> None:
    settings = make_settings(creator_model="stable-audio-3", storage_upload_limit=limit)
    row = job(mode="creator", duration=duration)
    if fits:
        assert plan_job(row, settings).duration == duration
    else:
        with pytest.raises(PermanentError, match="larger than the storage allows"):
            plan_job(row, settings)


def test_the_buckets_own_limit_counts_too() -> None:
    settings = make_settings(creator_model="stable-audio-3", storage_file_size_limit="20MB")
    with pytest.raises(PermanentError, match=r"\(20 MB\); choose 113 seconds or less"):
        plan_job(job(mode="creator", duration=120), settings)


@pytest.mark.parametrize(
    ("duration", "fallback", "model"),
    [
        (30, "stable-audio-2.5", "tangoflux"),
        (31, "stable-audio-2.5", "stable-audio-2.5"),
        (45, "stable-audio-2", "stable-audio-2"),
        (180, "stable-audio-3", "stable-audio-3"),
    ],
)
def test_a_row_longer_than_tangoflux_makes_goes_to_the_modes_fallback_whole(
    duration: int, fallback: str, model: str
) -> None:
    settings = make_settings(designer_model="tangoflux", designer_fallback_model=fallback, **TANGOFLUX)
    plan = plan_job(job(mode="designer", duration=duration), settings)
    assert (plan.model, plan.duration) == (model, duration)
    assert plan.prompt == f"deep warm bass groove. {duration_phrase(duration)}"


def test_the_fallback_is_per_mode() -> None:
    settings = make_settings(
        designer_model="tangoflux",
        producer_model="tangoflux",
        producer_fallback_model="stable-audio-3",
        **TANGOFLUX,
    )
    assert plan_job(job(mode="designer", duration=45), settings).model == "stable-audio-2.5"
    assert plan_job(job(mode="producer", duration=45), settings).model == "stable-audio-3"


@pytest.mark.parametrize("unset", ["none", "None", ""])
def test_with_no_fallback_a_length_no_model_makes_fails_before_anything_is_paid(unset: str) -> None:
    settings = make_settings(designer_model="tangoflux", designer_fallback_model=unset, **TANGOFLUX)
    assert settings.designer_fallback_model is None
    with pytest.raises(BadRequest) as failed:
        plan_job(job(mode="designer", duration=45), settings)
    assert failed.value.public_message == "The duration must be 1 to 30 seconds, not 45."


def test_stable_audio_3_refuses_a_row_past_380_seconds_before_anything_is_paid() -> None:
    with pytest.raises(PermanentError) as failed:
        plan_job(job(mode="creator", duration=381), make_settings(creator_model="stable-audio-3"))
    assert failed.value.public_message == "The duration must be 1 to 380 seconds, not 381."


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "ambient"}, "The 'ambient' mode is not supported; choose designer, producer or creator"),
        ({"duration": 181}, "The duration must be 1 to 180 seconds, not 181."),
        ({"duration": 0}, "The duration must be 1 to 180 seconds, not 0."),
        (
            {"quality": "ultra"},
            "The quality 'ultra' is unknown; choose low (draft), medium (standard) or high.",
        ),
        ({"prompt": " \x07 "}, "The prompt is empty. Describe the sound you want."),
        ({"prompt": "x" * 10_000, "mode": "creator"}, "characters long; the limit is 10000."),
    ],
)
def test_a_row_it_cannot_run_fails_with_a_reason_before_anything_is_paid(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(PermanentError) as failed:
        plan_job(job(**fields), make_settings())
    assert message in failed.value.public_message


def test_the_earlier_workers_modes_get_no_file_name_and_the_plugins_always_do() -> None:
    assert plan_job(job(mode="default"), make_settings()).filename is None
    assert plan_job(job(mode="designer"), make_settings()).filename is not None
