"""The plug-in's `generate` Edge Function, replayed against the local gateway (sona-plugin
supabase/functions/generate/index.ts at 34648b7): what it charges, how it words the charge, and the
row it inserts with the service role, sent as supabase-js sends them. The demo runs a job this way;
the plug-in tests (tests/plugin/) hold it to the plug-in's own schema.

Facts it honours, read in that file:
- defaults: mode `designer`, duration 10, quality `standard`;
- the price is base(mode) + duration extra + quality extra; the duration extra is the one of the
  smallest tier at or above the duration, else of the largest tier; `medium` is priced as
  `standard`, `low` as `draft`;
- the charge's description is `Tier (duration, quality): "prompt"` with the duration as `Ns`, `Mm`
  or `Mm Ss`, the quality as requested (not normalised) and the trimmed prompt cut to 30 characters
  plus `...` when longer;
- first check_user_tokens (402 when short), then use_tokens (500 when it fails), then the insert of
  one row with status `queued` (500 when it fails; the tokens stay spent), asked for as one object
  (`.insert([row]).select().single()`);
- naming_convention, musical_key and producer_config are JSON.stringify'd: jsonb string scalars
  holding compact JSON; musical_key only when a key is given (scale defaults to major);
  producer_config only for producer and creator with a BPM (type song for creator, loop for
  producer; 4/4 and 4 bars by default); user_email only for creator; keys left undefined are not sent.
Limit: the 30-character cut counts code points; JavaScript counts UTF-16 units (they differ only for
characters outside the Basic Multilingual Plane).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlencode

import requests

if TYPE_CHECKING:
    from devstack.emulators.gateway import Gateway

Mode = Literal["designer", "producer", "creator"]

BASE: dict[str, int] = {"designer": 4, "producer": 12, "creator": 20}
QUALITY_EXTRA: dict[str, dict[str, int]] = {
    "designer": {"draft": 0, "standard": 3, "high": 8},
    "producer": {"draft": 0, "standard": 4, "high": 10},
    "creator": {"draft": 0, "standard": 5, "high": 13},
}
# (up to seconds, extra) in ascending order; past the last tier the last extra applies.
DURATION_EXTRA: dict[str, tuple[tuple[int, int], ...]] = {
    "designer": ((10, 2), (20, 4)),
    "producer": ((8, 3), (18, 5), (30, 8)),
    "creator": ((120, 5), (180, 8)),
}
PRICED_QUALITY = {"medium": "standard", "low": "draft"}


def token_cost(mode: str, duration: int, quality: str) -> int:
    tiers = DURATION_EXTRA[mode]
    extra = next((e for limit, e in tiers if duration <= limit), tiers[-1][1])
    return BASE[mode] + extra + QUALITY_EXTRA[mode].get(PRICED_QUALITY.get(quality, quality), 0)


def format_duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    minutes, rest = divmod(seconds, 60)
    return f"{minutes}m" if rest == 0 else f"{minutes}m {rest}s"


def cost_description(mode: str, duration: int, quality: str, prompt: str) -> str:
    summary = prompt[:30] + "..." if len(prompt) > 30 else prompt
    return f'{mode.capitalize()} ({format_duration(duration)}, {quality}): "{summary}"'


def js_json(value: Any) -> str:
    """JSON.stringify's text: no spaces, keys in insertion order, non-ASCII kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class GenerateRequest:
    """The body the UI posts to `generate` (camelCase there; None = not sent)."""

    prompt: str
    duration: int | None = None
    quality: str | None = None
    mode: Mode | None = None
    naming_convention: dict[str, Any] | None = None
    skip_naming: bool | None = None
    key: str | None = None
    scale: str | None = None
    bpm: float | None = None  # an int unless the musician typed a fraction, as JSON.stringify shows it
    time_signature: str | None = None
    bars: int | None = None
    producer_type: str | None = None
    user_email: str | None = None

    @property
    def tier(self) -> str:
        return self.mode or "designer"

    @property
    def seconds(self) -> int:
        return self.duration if self.duration is not None else 10

    @property
    def quality_sent(self) -> str:
        return self.quality or "standard"

    def cost(self) -> int:
        return token_cost(self.tier, self.seconds, self.quality_sent)

    def description(self) -> str:
        return cost_description(self.tier, self.seconds, self.quality_sent, self.prompt.strip())

    def job_record(self, user_id: uuid.UUID) -> dict[str, Any]:
        """The row `generate` inserts, with only the keys it sends."""
        row: dict[str, Any] = {
            "user_id": str(user_id),
            "prompt": self.prompt.strip(),
            "duration": self.seconds,
            "quality": self.quality_sent,
            "mode": self.tier,
            "status": "queued",
            "skip_naming": bool(self.skip_naming),
        }
        if self.naming_convention is not None:
            row["naming_convention"] = js_json(self.naming_convention)
        if self.key is not None:
            row["musical_key"] = js_json({"key": self.key, "scale": self.scale or "major"})
        if self.mode in ("producer", "creator") and self.bpm is not None:
            kind = self.producer_type or ("song" if self.mode == "creator" else "loop")
            config = {"type": kind, "bpm": self.bpm, "timeSignature": self.time_signature or "4/4"}
            config["bars"] = self.bars or 4
            row["producer_config"] = js_json(config)
        if self.mode == "creator" and self.user_email is not None:
            row["user_email"] = self.user_email
        return row


@dataclass
class GenerateAnswer:
    """What `generate` answered: 201 with the job, 402 short of tokens, 500 after a failure."""

    status: int
    job: dict[str, Any] | None = None
    tokens_charged: int = 0
    error: dict[str, Any] = field(default_factory=dict)


def _service_headers(gateway: Gateway) -> dict[str, str]:
    key = gateway.service_role_key
    return {"apikey": key, "Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def generate_through_gateway(
    gateway: Gateway, user_id: uuid.UUID, request: GenerateRequest, *, charge: bool = True
) -> GenerateAnswer:
    """Replay `generate` after its JWT check, through the local gateway with the service role key:
    the two RPCs (unless `charge` is off: a database without the plug-in's token tables), then
    PostgREST's insert as supabase-js sends `.insert([row]).select().single()`."""
    headers = _service_headers(gateway)
    cost = request.cost() if charge else 0
    rest = f"{gateway.url}/rest/v1"
    if not charge:
        return _insert(rest, headers, user_id, request, cost)
    has = requests.post(
        f"{rest}/rpc/check_user_tokens",
        json={"p_user_id": str(user_id), "p_required": cost},
        headers=headers,
        timeout=10,
    )
    if has.status_code != 200:
        return GenerateAnswer(500, error=has.json())
    if has.json() is not True:
        return GenerateAnswer(402, error={"code": "INSUFFICIENT_TOKENS", "required": cost})
    charged = requests.post(
        f"{rest}/rpc/use_tokens",
        json={"p_user_id": str(user_id), "p_amount": cost, "p_description": request.description()},
        headers=headers,
        timeout=10,
    )
    if charged.status_code != 200 or charged.json() is not True:
        return GenerateAnswer(500, error={"message": "Could not deduct tokens"})
    return _insert(rest, headers, user_id, request, cost)


def _insert(
    rest: str, headers: dict[str, str], user_id: uuid.UUID, request: GenerateRequest, cost: int
) -> GenerateAnswer:
    row = request.job_record(user_id)
    # postgrest-js names an array's columns in `columns` and asks for one object with .single().
    query = urlencode({"columns": ",".join(f'"{name}"' for name in row), "select": "*"})
    inserted = requests.post(
        f"{rest}/jobs?{query}",
        data=json.dumps([row]),
        headers={**headers, "Prefer": "return=representation", "Accept": "application/vnd.pgrst.object+json"},
        timeout=10,
    )
    if inserted.status_code != 201:
        return GenerateAnswer(500, tokens_charged=cost, error=inserted.json())
    return GenerateAnswer(201, job=inserted.json(), tokens_charged=cost)
