"""What every PostgREST answer of the local gateway shares: the error body and status, the
`Accept` and `Prefer` headers read as PostgREST reads them, and the one transaction a request runs
in (the caller's role, then its JWT claims, so row level security in the database decides)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool
from werkzeug.wrappers import Request, Response

T = TypeVar("T")

ARRAY = "application/json"
OBJECT = "application/vnd.pgrst.object+json"
Shape = Literal["array", "object"]


class PostgrestError(Exception):
    """An answer PostgREST gives with {code, details, hint, message}; `Proxy-Status` carries the
    code too (PostgREST 13), so a HEAD request, which has no body, still says what went wrong."""

    def __init__(
        self, status: int, code: str, message: str, details: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.hint = status, code, message, details, hint

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "details": self.details, "hint": self.hint, "message": self.message}

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()),
            status=self.status,
            content_type="application/json; charset=utf-8",
            headers={"Proxy-Status": f"PostgREST; error={self.code}"},
        )


def from_database(exc: psycopg.Error, role: str) -> PostgrestError:
    """A PostgreSQL error as PostgREST forwards it: its SQLSTATE, message, detail and hint."""
    diag = exc.diag
    return PostgrestError(
        http_status(exc.sqlstate, anonymous=role == "anon"),
        exc.sqlstate or "XX000",
        diag.message_primary or str(exc),
        diag.message_detail,
        diag.message_hint,
    )


def not_served(what: str, detail: str) -> PostgrestError:
    """PostgREST's parse error (PGRST100) for query syntax this gateway does not translate: real
    PostgREST serves it, so the answer says so instead of answering differently."""
    return PostgrestError(
        400, "PGRST100", f'"failed to parse {what}"', f"not served by the local gateway: {detail}"
    )


def singular_error(rows: int) -> PostgrestError:
    """PostgREST's answer when one object was asked for and `rows` rows matched."""
    return PostgrestError(
        406,
        "PGRST116",
        "Cannot coerce the result to a single JSON object",
        f"The result contains {rows} rows",
    )


def json_answer(body: str, status: int = 200, shape: Shape = "array", **headers: str) -> Response:
    media = OBJECT if shape == "object" else ARRAY
    return Response(body, status=status, content_type=f"{media}; charset=utf-8", headers=headers)


def wanted_shape(request: Request) -> Shape:
    """The answer's shape from `Accept`: PostgREST's singular media type asks for one object; JSON
    or anything asks for an array; any other type alone is refused with PGRST107."""
    offered = [part.split(";")[0].strip().lower() for part in request.headers.get("Accept", "").split(",")]
    offered = [media for media in offered if media] or ["*/*"]
    for media in offered:
        if media in (OBJECT, "application/vnd.pgrst.object"):
            return "object"
        if media in (ARRAY, "*/*", "application/*"):
            return "array"
    raise PostgrestError(406, "PGRST107", f"None of these media types are available: {', '.join(offered)}")


@dataclass(frozen=True)
class Preferences:
    count: bool = False
    representation: bool = False


SERVED_PREFERENCES = {
    "return": {"representation", "minimal"},
    "count": {"exact", "planned", "estimated"},
}


def preferences(request: Request) -> Preferences:
    """`Prefer` as PostgREST reads it. planned and estimated counts are answered exactly; a
    preference that changes what a write does and is not translated here is refused (PGRST122)."""
    given: dict[str, str] = {}
    for header in request.headers.getlist("Prefer"):
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            if name:
                given[name.strip().lower()] = value.strip().lower()
    refused = [f"{k}={v}" for k, v in given.items() if k in ("missing", "resolution", "tx", "max-affected")]
    refused += [
        f"{k}={v}" for k, v in given.items() if k in SERVED_PREFERENCES and v not in SERVED_PREFERENCES[k]
    ]
    if refused:
        raise PostgrestError(
            400,
            "PGRST122",
            "Invalid preferences given with handling=strict",
            f"Invalid preferences: {', '.join(refused)} (not served by the local gateway)",
        )
    return Preferences(count="count" in given, representation=given.get("return") == "representation")


def check_profile(request: Request, schema: str) -> None:
    """Accept-Profile (reads) and Content-Profile (writes) name the schema; only one is served."""
    for header in ("Accept-Profile", "Content-Profile"):
        asked = request.headers.get(header)
        if asked is not None and asked != schema:
            raise PostgrestError(406, "PGRST106", f"The schema must be one of the following: {schema}")


def run_as(
    pool: ConnectionPool, role: str, claims: dict[str, Any], work: Callable[[psycopg.Connection[Any]], T]
) -> T:
    """One transaction as PostgREST runs a request: the role, then the JWT's claims, then the work.
    A PostgrestError raised by the work (a singular answer that does not fit) rolls it back."""
    with pool.connection() as conn, conn.transaction():
        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        return work(conn)


def http_status(sqlstate: str | None, *, anonymous: bool = False) -> int:
    """PostgREST's HTTP status for a SQLSTATE (its errors reference)."""
    code = sqlstate or ""
    exact = {
        "P0001": 400,
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "42883": 404,
        "42P01": 404,
        "42P17": 500,
        "42501": 401 if anonymous else 403,
        "40001": 409,
        "40P01": 409,
        "53400": 500,
        "57014": 500,
    }
    if code in exact:
        return exact[code]
    by_class = {
        "08": 503,
        "09": 500,
        "0L": 403,
        "0P": 403,
        # no "23" class: only 23503 and 23505 are 409; a check or not-null violation is 400
        "25": 500,
        "28": 403,
        "2D": 500,
        "38": 500,
        "39": 500,
        "3B": 500,
        "40": 500,
        "53": 503,
        "54": 500,
        "55": 500,
        "57": 500,
        "58": 500,
        "F0": 500,
        "HV": 500,
        "P0": 500,
        "XX": 500,
    }
    return by_class.get(code[:2], 400)
