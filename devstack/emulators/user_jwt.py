"""A signed-in user's access token, as Supabase Auth issues it to the plug-in and the API gateway's
services verify it: HS256 with the project's JWT secret, `role` authenticated, `sub` the user id.
Minimal on purpose: the local stack mints these for its users and the gateway checks them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import uuid
from typing import Any, Literal

USER_ROLE = "authenticated"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_jwt(secret: str, claims: dict[str, Any]) -> str:
    """An HS256 JWT of `claims`, signed with the project's secret."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def make_user_jwt(secret: str, user_id: uuid.UUID | str, ttl_s: int = 3600, email: str | None = None) -> str:
    """An access token for `user_id` (the claims Supabase Auth puts in one that matter here)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "sona-local/auth/v1",
        "sub": str(user_id),
        "role": USER_ROLE,
        "aud": USER_ROLE,
        "iat": now,
        "exp": now + ttl_s,
    }
    if email:
        claims["email"] = email
    return sign_jwt(secret, claims)


def verify_jwt(token: str, secret: str, now: float | None = None) -> dict[str, Any] | None:
    """The claims of an HS256 token signed with `secret` and not expired; None for anything else."""
    claims, _ = check_jwt(token, secret, now)
    return claims


def check_jwt(
    token: str, secret: str, now: float | None = None
) -> tuple[dict[str, Any] | None, Literal["invalid", "expired"] | None]:
    """(claims, None) for a good token, else (None, why): PostgREST answers the two differently."""
    try:
        header_part, payload_part, signature_part = token.split(".")
        header = json.loads(_unb64(header_part))
        claims = json.loads(_unb64(payload_part))
        signature = _unb64(signature_part)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None, "invalid"
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        return None, "invalid"
    good = hmac.new(secret.encode(), f"{header_part}.{payload_part}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, good):
        return None, "invalid"
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and exp <= (time.time() if now is None else now):
        return None, "expired"
    return claims, None
