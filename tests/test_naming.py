"""The download name (`filename`) of a plug-in job, as the plug-in's worker named its files
(audio-worker/src/naming-generator/index.ts and filename-builder.ts at 34648b7; PLUGIN.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sona.job.modes import plan_job
from tests.support import make_settings
from tests.test_modes import KEY, LOOP, job


def name(**fields: Any) -> str | None:
    return plan_job(job(**fields), make_settings()).filename


def convention(*types: str, separator: str = "_", **values: str) -> dict[str, Any]:
    return {
        "parameters": [{"type": t, **({"value": values[t]} if t in values else {})} for t in types],
        "separator": separator,
    }


def test_with_no_convention_the_default_one_names_category_name_creator_and_source() -> None:
    assert name(prompt="deep warm bass groove") == "GEN_DeepWarmBass_Sona_StableAudio"


def test_skip_naming_gives_mode_name_and_the_creation_time_in_base_36() -> None:
    created = job().created_at
    assert created is not None
    millis = round(created.timestamp() * 1000)
    digits = ""
    while millis:
        millis, rest = divmod(millis, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[rest] + digits
    assert name(mode="producer", skip_naming=True) == f"Producer_DeepWarmBass_{digits}"


@pytest.mark.parametrize(
    ("fields", "filename"),
    [
        (
            {
                "mode": "producer",
                "musical_key": KEY,
                "producer_config": LOOP,
                "naming_convention": convention("bpm", "key", "scale", "fxName", separator="-"),
            },
            "124-A-Minor-DeepWarmBass",
        ),
        (
            {
                "mode": "creator",
                "user_email": "jaime@example.com",
                "naming_convention": convention(
                    "artistPrefix", "songName", "master", "sampleRate", "bitDepth"
                ),
            },
            "JA_DeepWarmBass_Master_44k_16b",
        ),
        (
            {"naming_convention": convention("custom", "date", "variation", custom="SFX")},
            "SFX_20260120_01",
        ),
        ({"naming_convention": convention("uuid")}, "000000"),
        ({"prompt": "!! ??", "naming_convention": convention("category", "fxName")}, "GEN_GeneratedSound"),
        ({"naming_convention": convention("object", "action")}, "GEN_DeepWarmBass"),
    ],
)
def test_the_users_convention_builds_the_name(fields: dict[str, Any], filename: str) -> None:
    assert name(**fields) == filename


def test_a_convention_stored_as_generates_json_string_reads_the_same() -> None:
    as_object = convention("fxName", "creator", separator=".")
    assert (
        name(naming_convention=json.dumps(as_object))
        == name(naming_convention=as_object)
        == "DeepWarmBass.Sona"
    )


def test_every_attempt_of_a_job_names_its_file_the_same() -> None:
    fields = {"naming_convention": convention("timestamp", "uuid", "date")}
    assert name(**fields) == name(**fields)


HOSTILE = [
    (
        "a path as separator",
        convention("category", "fxName", separator="/../../../../tmp/"),
        "GEN...DeepWarmBass",
    ),
    ("a backslash and a newline", convention("category", "fxName", separator="\\\n"), "GENDeepWarmBass"),
    ("a 100 KB separator", convention("category", "fxName", separator="_" * 100_000), "GEN___DeepWarmBass"),
]


@pytest.mark.parametrize(("case", "hostile", "filename"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_convention_still_gives_a_file_name_not_a_path(
    case: str, hostile: dict[str, Any], filename: str
) -> None:
    assert name(naming_convention=hostile) == filename


def test_a_huge_convention_gives_a_bounded_name() -> None:
    huge = convention(*["fxName"] * 20_000, separator="-")  # about 100 KB of JSON
    made = name(naming_convention=huge)
    assert made is not None and len(made) <= 120
    assert made.startswith("DeepWarmBass-DeepWarmBass") and not made.endswith("-")
