"""The two Supabase Auth (GoTrue) endpoints a client of the local stack needs, answered in GoTrue's
shapes: `GET /auth/v1/user` (supabase-js's `auth.getUser(token)`, which the plug-in's `generate`
calls for every request) and the password grant `POST /auth/v1/token?grant_type=password`
(`signInWithPassword`).

Local on purpose: auth.users is read for the user, but password hashes are not checked (a real
Supabase database stores bcrypt hashes this stack has no library for, and the embedded one stores
none). Every user of auth.users signs in with the stack's one local password, which `dev` prints;
any other password is refused as GoTrue refuses a wrong one.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from typing import Any

from psycopg_pool import ConnectionPool
from werkzeug.wrappers import Request, Response

from devstack.emulators.user_jwt import check_jwt, make_user_jwt

ACCESS_TOKEN_TTL_S = 3600


def gotrue_error(status: int, error_code: str, msg: str) -> Response:
    """GoTrue's error body (API version 2024-01-01 and later): {code, error_code, msg}."""
    body = {"code": status, "error_code": error_code, "msg": msg}
    return Response(json.dumps(body), status=status, content_type="application/json")


class AuthApi:
    def __init__(self, pool: ConnectionPool, jwt_secret: str, password: str) -> None:
        self._pool = pool
        self._jwt_secret = jwt_secret
        self.password = password

    def handle(self, route: str, request: Request) -> Response:
        if route == "auth:user" and request.method == "GET":
            return self._user(request)
        if route == "auth:token" and request.method == "POST":
            return self._token(request)
        return gotrue_error(
            404, "not_found", "Not served by the local stack: only GET /user and the password grant"
        )

    def _user(self, request: Request) -> Response:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not token:
            return gotrue_error(401, "no_authorization", "This endpoint requires a valid Bearer token")
        claims, problem = check_jwt(token, self._jwt_secret)
        if claims is None:
            why = (
                "token has invalid claims: token is expired"
                if problem == "expired"
                else ("unable to parse or verify signature, signature is invalid")
            )
            return gotrue_error(403, "bad_jwt", f"invalid JWT: {why}")
        user = self._find("id::text = %s", str(claims.get("sub", "")))
        if user is None:
            return gotrue_error(403, "user_not_found", "User from sub claim in JWT does not exist")
        return Response(json.dumps(user), status=200, content_type="application/json")

    def _token(self, request: Request) -> Response:
        grant = request.args.get("grant_type")
        if grant != "password":
            return gotrue_error(
                400, "validation_failed", f"unsupported_grant_type: {grant} (the local stack serves password)"
            )
        body = request.get_json(force=True, silent=True)
        email = body.get("email") if isinstance(body, dict) else None
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(email, str) or not isinstance(password, str) or not email or not password:
            return gotrue_error(400, "validation_failed", "missing email or phone")
        user = self._find("lower(email) = lower(%s)", email)
        good = hmac.compare_digest(password.encode(), self.password.encode())
        if user is None or not good:
            return gotrue_error(400, "invalid_credentials", "Invalid login credentials")
        return Response(json.dumps(self.session(user)), status=200, content_type="application/json")

    def session(self, user: dict[str, Any]) -> dict[str, Any]:
        """GoTrue's answer to a grant: the access token, its life, a refresh token and the user."""
        now = int(time.time())
        token = make_user_jwt(self._jwt_secret, user["id"], ACCESS_TOKEN_TTL_S, email=user.get("email"))
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": ACCESS_TOKEN_TTL_S,
            "expires_at": now + ACCESS_TOKEN_TTL_S,
            "refresh_token": uuid.uuid4().hex,
            "user": user,
        }

    def _find(self, condition: str, value: str) -> dict[str, Any] | None:
        """The user as GoTrue's user object, from whatever columns auth.users has (the embedded
        stand-in has id, email, created_at; a copy of a real project has GoTrue's own)."""
        with self._pool.connection() as conn:
            row = conn.execute(
                f"select to_jsonb(u) from auth.users u where {condition} limit 1",  # type: ignore[arg-type]
                (value,),
            ).fetchone()
            conn.rollback()
        return user_object(row[0]) if row else None


def user_object(row: dict[str, Any]) -> dict[str, Any]:
    confirmed = row.get("email_confirmed_at") or row.get("confirmed_at")
    app = row.get("raw_app_meta_data") or {"provider": "email", "providers": ["email"]}
    return {
        "id": row["id"],
        "aud": row.get("aud") or "authenticated",
        "role": row.get("role") or "authenticated",
        "email": row.get("email") or "",
        "email_confirmed_at": confirmed,
        "phone": row.get("phone") or "",
        "confirmed_at": confirmed,
        "last_sign_in_at": row.get("last_sign_in_at"),
        "app_metadata": app,
        "user_metadata": row.get("raw_user_meta_data") or {},
        "identities": [],
        "created_at": row.get("created_at"),
        "updated_at": row.get("updated_at") or row.get("created_at"),
        "is_anonymous": bool(row.get("is_anonymous", False)),
    }
