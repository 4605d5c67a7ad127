"""PostgREST's mapping from a PostgreSQL error to an HTTP status (its errors reference)."""

from __future__ import annotations


def http_status(sqlstate: str | None, *, anonymous: bool = False) -> int:
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
        "57014": 500,
    }
    if code in exact:
        return exact[code]
    by_class = {
        "08": 503,
        "09": 500,
        "0L": 403,
        "0P": 403,
        "23": 409,
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
