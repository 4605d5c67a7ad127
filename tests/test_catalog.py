"""One table of model facts (sona/catalog.py): the settings accept and price exactly its models, the
plan reads its steps and strength, and every model reaches the pipeline with its engine."""

from __future__ import annotations

import uuid

import pytest

from sona.catalog import MODELS
from sona.config import DEFAULT_MODEL_CREDITS, ConfigError
from sona.errors import PermanentError
from sona.job.modes import plan_job
from sona.rows import Job
from sona.services import Services
from tests.support import make_settings

TOKEN = "r8_sentinel-replicate-token-catalog"
SETTINGS = ("designer_model", "producer_model", "creator_model")


def row(**fields: object) -> Job:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "prompt": "glass harmonica",
        "duration": 8,
        "quality": "high",
        "mode": "designer",
        "status": "queued",
    }
    return Job.model_validate(values | fields)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("model", MODELS)
def test_each_mode_setting_accepts_every_model_of_the_catalog(setting: str, model: str) -> None:
    settings = make_settings(**{setting: model, "replicate_api_token": TOKEN})
    assert getattr(settings, setting) == model


@pytest.mark.parametrize("setting", [*SETTINGS, "stable_audio_model"])
def test_a_model_the_catalog_does_not_know_is_refused_by_name(setting: str) -> None:
    with pytest.raises(ConfigError, match="stable-audio-4"):
        make_settings(**{setting: "stable-audio-4"})


def test_the_earlier_workers_model_must_take_an_input_for_audio_to_audio() -> None:
    takes_none = [name for name, model in MODELS.items() if not model.takes_input]
    assert takes_none == ["tangoflux"]
    with pytest.raises(ConfigError, match="a model that takes an input"):
        make_settings(stable_audio_model="tangoflux", replicate_api_token=TOKEN)


def test_every_model_is_priced_by_default_at_its_catalog_credits() -> None:
    assert {name: model.credits for name, model in MODELS.items()} == DEFAULT_MODEL_CREDITS


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("quality", ["low", "medium", "high"])
def test_the_plan_asks_each_model_for_its_own_steps(model: str, quality: str) -> None:
    settings = make_settings(designer_model=model, replicate_api_token=TOKEN)
    plan = plan_job(row(quality=quality, duration=5), settings)
    assert (plan.request.model, plan.request.steps) == (model, MODELS[model].steps[quality])  # type: ignore[index]


@pytest.mark.parametrize("model", [name for name, model in MODELS.items() if model.takes_input])
def test_audio_to_audio_refuses_a_strength_below_the_models_least(model: str) -> None:
    least = MODELS[model].min_strength
    settings = make_settings(stable_audio_model=model)
    owner = uuid.uuid4()
    job = row(mode="audio-to-audio", input_path=f"{owner}/riff.wav", strength=least, user_id=owner)
    assert plan_job(job, settings).request.strength == least
    if least > 0:
        with pytest.raises(PermanentError, match=f"{least:g} to 1 with {model}"):
            plan_job(job.model_copy(update={"strength": least / 2}), settings)


def test_every_model_reaches_the_pipeline_with_the_engine_its_entry_names() -> None:
    engines = Services(make_settings(replicate_api_token=TOKEN)).engines
    assert set(engines) == set(MODELS)
    for name, model in MODELS.items():
        same_engine = [other for other, facts in MODELS.items() if facts.engine == model.engine]
        assert all(engines[other] is engines[name] for other in same_engine), name
