"""Supabase API keys: which kind a key is, and the headers it may be sent in.

Projects issue `sb_secret_…` and `sb_publishable_…` keys, which are not JWTs and must travel only as
`apikey` (as a Bearer token PostgREST answers PGRST301 and Storage "Invalid Compact JWS"). The legacy
keys are JWTs whose `role` claim says what they are; they keep `apikey` plus `Authorization: Bearer`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from enum import StrEnum

SECRET_PREFIX = "sb_secret_"  # noqa: S105 (a prefix, not a secret)
PUBLISHABLE_PREFIX = "sb_publishable_"
SERVICE_ROLE = "service_role"

# Why the function needs the service role: said wherever a weaker key is refused.
_WHY = (
    "row level security hides Storage listings from it, so a retried job could not find the audio "
    "an earlier attempt stored and would pay for a second generation; use the project's secret key "
    "(sb_secret_...) or its legacy service_role key"
)
_PRINTABLE_ROLE = re.compile(r"^[a-z_]{1,32}$")


class KeyKind(StrEnum):
    LEGACY_JWT = "legacy_jwt"
    SECRET = "secret"  # noqa: S105 (a kind, not a secret)
    PUBLISHABLE = "publishable"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SupabaseKey:
    """What a key is; never the key itself, so it can be logged. A dataclass, not a model: it is made
    here from what classify found, never validated from outside, and a pydantic model cost a cold
    function's first answer its class and validator (the settings check the key)."""

    kind: KeyKind
    role: str | None = None  # a legacy JWT's role claim

    @property
    def is_jwt(self) -> bool:
        return self.kind is KeyKind.LEGACY_JWT

    @property
    def has_service_role(self) -> bool:
        return self.kind is KeyKind.SECRET or (self.is_jwt and self.role == SERVICE_ROLE)


def classify(key: str) -> SupabaseKey:
    """Tell the kinds apart by shape; a JWT's payload is decoded but not verified (only the
    gateway can, and it will)."""
    if key.startswith(SECRET_PREFIX):
        return SupabaseKey(kind=KeyKind.SECRET)
    if key.startswith(PUBLISHABLE_PREFIX):
        return SupabaseKey(kind=KeyKind.PUBLISHABLE)
    claims = _jwt_claims(key)
    if claims is None:
        return SupabaseKey(kind=KeyKind.UNKNOWN)
    role = claims.get("role")
    return SupabaseKey(kind=KeyKind.LEGACY_JWT, role=role if isinstance(role, str) else None)


def _jwt_claims(key: str) -> dict[str, object] | None:
    parts = key.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def request_headers(key: str) -> dict[str, str]:
    """The headers that carry the key to PostgREST and Storage through Supabase's gateway."""
    if classify(key).is_jwt:
        return {"apikey": key, "Authorization": f"Bearer {key}"}
    # A non-JWT as Bearer is refused downstream; the gateway turns `apikey` into the role's JWT.
    return {"apikey": key}


def key_problem(key: str) -> str | None:
    """Why the key cannot run jobs (an anon or publishable key), or None. Never contains the key."""
    info = classify(key)
    if info.kind is KeyKind.PUBLISHABLE:
        return f"is a publishable key (sb_publishable_...), not a secret key: {_WHY}"
    if info.is_jwt and not info.has_service_role:
        role = info.role if info.role and _PRINTABLE_ROLE.match(info.role) else "no service_role"
        return f"is a legacy JWT with role {role!r}, not the service_role key: {_WHY}"
    return None


def key_warning(key: str) -> str | None:
    """A key of no known shape is sent as `apikey` only and left to the gateway to judge."""
    if classify(key).kind is KeyKind.UNKNOWN:
        return (
            "SUPABASE_SERVICE_ROLE_KEY is neither a secret key (sb_secret_...) nor a legacy JWT; "
            "it is sent as the apikey header only, and the first request will fail if Supabase "
            "does not accept it"
        )
    return None
