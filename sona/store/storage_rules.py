"""Supabase Storage's own rules for names and sizes (supabase/storage v1.70.6, src/storage/limits.ts
and src/http/schemas/file-size-limit.ts), kept in one place for `validate`, the Storage client and
the local emulation. No imports beyond the standard library: config validation uses it."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

# limits.ts VALID_OBJECT_KEY / VALID_BUCKET_NAME: ASCII letters, digits and a few punctuation marks.
_OBJECT_KEY = re.compile(r"[A-Za-z0-9_/!.*'() &$=@;:+,?-]*")
_BUCKET_NAME = re.compile(r"[A-Za-z0-9_!.*'() &$=@;:+,?-]*")
MAX_BUCKET_NAME = 100

# parseFileSizeToBytes: a number, then GB, MB, KB or B in any case, decimal units, no space.
_FILE_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(gb|mb|kb|b)", re.IGNORECASE)
_UNITS = {"gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}
FILE_SIZE_HINT = "a size like 50MB, 500KB or 1GB (decimal units, no space)"


def is_valid_key(key: str) -> bool:
    """limits.ts isValidKey: what Storage accepts as an object name (else 400 InvalidKey)."""
    return bool(key) and _OBJECT_KEY.fullmatch(key) is not None


def is_valid_bucket_name(name: str) -> bool:
    """limits.ts isValidBucketName, plus createBucket's refusal of surrounding whitespace."""
    return (
        0 < len(name) <= MAX_BUCKET_NAME and name.strip() == name and _BUCKET_NAME.fullmatch(name) is not None
    )


def parse_file_size(text: str) -> int:
    """limits.ts parseFileSizeToBytes: the number is rounded to 3 significant digits first, as
    Storage does (`+parseFloat(v).toPrecision(3)`); ValueError for what Storage refuses."""
    match = _FILE_SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"must be {FILE_SIZE_HINT}")
    number, unit = match.groups()
    return round(_three_significant_digits(float(number)) * _UNITS[unit.lower()])


def _three_significant_digits(value: float) -> float:
    """JavaScript's toPrecision(3): the exact binary value, ties rounded up (1.125 -> 1.13)."""
    exact = Decimal(value)
    if not exact:
        return 0.0
    return float(exact.quantize(Decimal(1).scaleb(exact.adjusted() - 2), rounding=ROUND_HALF_UP))


def url_unsafe_part(key: str) -> str | None:
    """What Storage stores but a URL cannot carry verbatim: `?` starts a query, `#` a fragment
    (Storage refuses `#` anyway), and `//` collapses or breaks the path."""
    for part in ("?", "#", "//"):
        if part in key:
            return part
    return None
