"""The download name of a plug-in job (its `filename` column), as the plug-in's worker named files
(audio-worker/src/naming-generator/index.ts and filename-builder.ts at 34648b7):

- `skip_naming`: `{Mode}_{Name}_{time in base 36}`, Name being the prompt's first three words of
  more than two letters, capitalised (`Sound` when there are none);
- otherwise the user's naming convention (`{"parameters": [{"type", "value"?, "format"?}],
  "separator"}`, or the default `category, fxName, creator, source` joined by `_`), each part
  stripped to letters and digits with its first letter capitalised, empty parts left out.

The plug-in's worker asked a language model for the category and the name; with no such model here
the values are the ones that worker fell back to when its model failed (category `GEN`, the name
from the prompt's words), and the tempo, key and scale come from what the musician chose. Every
value that worker drew from the clock or at random (`date`, `timestamp`, `uuid`) is taken from the
row instead (its creation time, its id), so every attempt of a job names its file the same.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from sona.rows import json_column

if TYPE_CHECKING:
    from sona.rows import Job, MusicalKey, ProducerConfig

_DIGITS36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# A download name, never a path: the separator keeps only these characters (the plug-in's UI offers
# `_`, `-`, `.` and a space), at most MAX_SEPARATOR of them, and the whole name is cut to MAX_NAME
# (the table's jobs_filename_safe check allows 200).
_SEPARATOR_CHARS = re.compile(r"[^a-zA-Z0-9 _.\-]")
MAX_SEPARATOR = 3
MAX_NAME = 120


class NamingParameter(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    value: str | None = None
    format: str | None = None


class NamingConvention(BaseModel):
    model_config = ConfigDict(extra="ignore")
    parameters: list[NamingParameter]
    separator: str = "_"


DEFAULT_CONVENTION = NamingConvention(
    parameters=[NamingParameter(type=t) for t in ("category", "fxName", "creator", "source")]
)


def download_name(job: Job, key: MusicalKey | None, config: ProducerConfig | None, engine_label: str) -> str:
    words = _name_words(job.prompt)
    created = job.created_at or datetime.fromtimestamp(0, UTC)
    if job.skip_naming:
        millis = round(created.timestamp() * 1000)
        return _bounded(f"{_part(job.mode)}_{words or 'Sound'}_{_base36(millis)}")
    values = {
        "category": "GEN",
        "fxName": words or "GeneratedSound",
        "songName": words or "Song",
        "variation": "01",
        "bpm": number_text(config.bpm) if config is not None and config.bpm else "",
        "key": key.key or "" if key is not None else "",
        "scale": key.scale if key is not None and key.key else "",
        "type": config.type or "" if config is not None else "",
        "artistPrefix": _artist_prefix(job.user_email) if job.mode == "creator" else "SN",
        "creator": "Sona",
        "source": engine_label,
        "timestamp": str(round(created.timestamp() * 1000)),
        "uuid": str(job.id).replace("-", "")[:6],
    }
    convention = naming_convention(job.naming_convention)
    parts = [_part(_value(p, values, created)) for p in convention.parameters]
    parts = [p for p in parts if p] or ["GEN", _part(values["fxName"])]
    return _bounded(_separator(convention.separator).join(parts))


def naming_convention(value: Any) -> NamingConvention:
    try:
        return NamingConvention.model_validate(json_column(value))
    except ValidationError:
        return DEFAULT_CONVENTION


def _value(parameter: NamingParameter, values: dict[str, str], created: datetime) -> str:
    custom = parameter.value
    defaults = {"master": "Master", "sampleRate": "44k", "bitDepth": "16b", "custom": ""}
    if parameter.type in defaults:
        return custom or defaults[parameter.type]
    if parameter.type == "date":
        fmt = parameter.format or "YYYYMMDD"
        return (
            fmt.replace("YYYY", f"{created.year:04d}", 1)
            .replace("MM", f"{created.month:02d}", 1)
            .replace("DD", f"{created.day:02d}", 1)
        )
    return values.get(parameter.type, "")


def _separator(sent: str) -> str:
    """The user's separator without path separators or control characters, and short: a convention
    is the user's own JSON, so `/../` or 100 KB of it must not reach the name."""
    return _SEPARATOR_CHARS.sub("", sent)[:MAX_SEPARATOR]


def _bounded(name: str) -> str:
    """At most MAX_NAME characters, never starting or ending with a separator character."""
    return name[:MAX_NAME].strip(" _.-") or "Sound"


def _name_words(prompt: str) -> str:
    letters = re.sub(r"[^a-zA-Z\s]", "", prompt)
    words = [w for w in letters.split() if len(w) > 2][:3]
    return "".join(w[:1].upper() + w[1:].lower() for w in words)


def _part(value: str) -> str:
    cleaned = re.sub(r"[^a-zA-Z0-9]", "", value)
    return cleaned[:1].upper() + cleaned[1:]


def _artist_prefix(email: str | None) -> str:
    local = (email or "").split("@")[0]
    return local[:2].upper() if len(local) >= 2 else "SN"


def number_text(value: float) -> str:
    """A number as JavaScript prints it (120, not 120.0), as the plug-in's worker wrote it."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _base36(number: int) -> str:
    digits = ""
    while True:
        number, rest = divmod(number, 36)
        digits = _DIGITS36[rest] + digits
        if number == 0:
            return digits
