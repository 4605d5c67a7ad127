"""Settings from the environment, by pydantic-settings' rules (sona/environment.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field, SecretStr, field_validator

from sona.environment import ConfigError, EnvironmentSettings, load


class Example(EnvironmentSettings):
    name: str = "default"
    count: int = Field(default=1, ge=1)
    prices: dict[str, float] = Field(default_factory=dict)
    token: SecretStr | None = None


# (what the environment holds, what .env holds, what load() is given, the field read, its value)
RULES: list[tuple[str, dict[str, str], str, dict[str, object], str, object]] = [
    ("a field is read from its upper-case name", {"NAME": "env"}, "", {}, "name", "env"),
    ("names match in any case", {"nAmE": "mixed"}, "", {}, "name", "mixed"),
    ("the environment wins over .env", {"NAME": "env"}, "NAME=file\n", {}, "name", "env"),
    ("a .env fills what the environment lacks", {}, "COUNT=7\n", {}, "count", 7),
    (".env may quote and comment", {}, "# a note\nexport NAME='quoted value'\n", {}, "name", "quoted value"),
    ("load()'s arguments win over both", {"NAME": "env"}, "NAME=file\n", {"name": "given"}, "name", "given"),
    ("a dict field takes JSON", {"PRICES": '{"a": 2.5}'}, "", {}, "prices", {"a": 2.5}),
    ("an unset field keeps its default", {"OTHER": "x"}, "", {}, "name", "default"),
]


@pytest.mark.parametrize(
    ("environ", "dotenv", "given", "field", "expected"),
    [r[1:] for r in RULES],
    ids=[r[0] for r in RULES],
)
def test_a_setting_is_read_by_pydantic_settings_rules(
    tmp_path: Path,
    environ: dict[str, str],
    dotenv: str,
    given: dict[str, object],
    field: str,
    expected: object,
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(dotenv)
    settings = load(Example, environ=environ, env_file=env_file, **given)
    assert getattr(settings, field) == expected


def test_without_a_env_file_only_the_environment_counts(tmp_path: Path) -> None:
    settings = load(Example, environ={"COUNT": "3"}, env_file=tmp_path / "missing.env")
    assert (settings.name, settings.count) == ("default", 3)


def test_every_problem_is_listed_at_once_and_no_value_is_echoed() -> None:
    environ = {"COUNT": "0", "PRICES": "not json s3cret", "TOKEN": "t0ken-value"}
    with pytest.raises(ConfigError) as caught:
        load(Example, environ=environ, env_file=None)
    text = str(caught.value)
    assert caught.value.problems == [
        "COUNT Input should be greater than or equal to 1",
        "PRICES Input should be a valid dictionary",
    ]
    assert "s3cret" not in text and "t0ken-value" not in text


class Normalised(EnvironmentSettings):
    url: str = "https://example.com/"

    @field_validator("url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


def test_a_default_passes_the_same_validators_as_a_given_value() -> None:
    assert load(Normalised, environ={}, env_file=None).url == "https://example.com"
