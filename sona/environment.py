"""Settings models read from the environment, by the rules pydantic-settings applies with
case_sensitive=False: a field is read from the variable of its name in any case, then from a .env
file in the working directory (the environment wins); dict and list fields take JSON; values given
to load() win over both. Every problem is reported at once, and no value is ever echoed.

The rules are applied here, in a few lines, rather than by pydantic-settings itself: importing it
(with the asyncio and cloud secret-manager sources it loads) cost a cold function about 25 ms,
a sixth of a bare function's whole cold start (PERFORMANCE.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

ENV_FILE = Path(".env")


class EnvironmentSettings(BaseModel):
    """A settings model: unknown variables are ignored; defaults pass the same validators as given
    values (as BaseSettings does); errors never show the value given."""

    # Built on first use (defer_build): a function validates only Settings, so the models it is made
    # from (JobShape, FunctionOptions, ...) are never built on a cold start (about 10 ms).
    model_config = ConfigDict(
        extra="ignore", hide_input_in_errors=True, validate_default=True, defer_build=True
    )


S = TypeVar("S", bound=EnvironmentSettings)


class ConfigError(Exception):
    """Every configuration problem at once, in one readable message (never a secret value)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def load(
    model: type[S],
    *,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = ENV_FILE,
    **overrides: object,
) -> S:
    """The model from the environment (os.environ unless given), .env, and overrides; raise
    ConfigError listing every problem."""
    given = os.environ if environ is None else environ
    values: dict[str, object] = environment_values(model, given, env_file)
    values.update(overrides)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError([_describe(dict(e)) for e in exc.errors(include_input=False)]) from None


def environment_names(environ: Mapping[str, str], env_file: Path | None) -> dict[str, str]:
    """Every variable the environment and .env give, by its lower-case name (the environment wins)."""
    given: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        given = read_env_file(env_file)
    given.update((k.lower(), v) for k, v in environ.items())
    return given


def read_env_file(path: Path) -> dict[str, str]:
    """A .env-style file's variables by lower-case name (python-dotenv's syntax: quotes, comments,
    `export`)."""
    from dotenv import dotenv_values  # only where there is such a file (never on Cloud Functions)

    return {k.lower(): v for k, v in dotenv_values(path, encoding="utf-8").items() if v is not None}


def environment_values(
    model: type[BaseModel], environ: Mapping[str, str], env_file: Path | None
) -> dict[str, object]:
    """The model's fields as the environment and .env give them (names matched in any case)."""
    given = environment_names(environ, env_file)
    return {
        name: _decoded(field.annotation, given[name])
        for name, field in model.model_fields.items()
        if name in given
    }


def _decoded(annotation: Any, text: str) -> object:
    """A dict or list field's value is JSON; anything else is validated from the text as is."""
    if annotation in (dict, list) or get_origin(annotation) in (dict, list):
        try:
            return json.loads(text)
        except ValueError:
            return text  # validation then says the value is not a dict (or list)
    return text


def _describe(error: dict[str, object]) -> str:
    loc = error.get("loc") or ()
    name = str(loc[0]).upper() if isinstance(loc, tuple) and loc else ""
    message = str(error.get("msg", "is invalid"))
    if error.get("type") == "missing":
        message = "is required but not set"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    # A model-level check (no single field) already names its settings in its message.
    return f"{name} {message}" if name else message
