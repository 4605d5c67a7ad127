"""What the three doors share: JSON answers, the webhook secret's check, the body read within its
size limit, and the instance's services (or a 500 saying the function is misconfigured)."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from flask import Request, Response

from sona.config import ConfigError, Settings
from sona.models import SECRET_HEADER
from sona.services import Services, get_services

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000


def reply(status: int, body: dict[str, Any]) -> Response:
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    if status == 405:
        response.headers["Allow"] = "POST"
    return response


def error(status: int, code: str, message: str, **extra: Any) -> Response:
    return reply(status, {"error": code, "message": message, **extra})


def secret_matches(request: Request, settings: Settings) -> bool:
    given = request.headers.get(SECRET_HEADER, "").encode()
    expected = settings.webhook_secret.get_secret_value().encode()
    return hmac.compare_digest(given, expected)  # constant time, whatever the length


def services_or_error() -> Services | Response:
    try:
        return get_services()
    except ConfigError as exc:
        log.error("%s", exc)
        return error(500, "misconfigured", "The function is misconfigured; see its logs.")


def read_json(request: Request) -> Any | Response:
    """The body as JSON, read no further than the size limit (a chunked body has no length)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return error(413, "payload_too_large", f"The body is over {MAX_BODY_BYTES} bytes.")
    if request.mimetype != "application/json":
        return error(
            415,
            "unsupported_media_type",
            "Send the webhook payload as Content-Type: application/json.",
        )
    raw = request.stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        return error(413, "payload_too_large", f"The body is over {MAX_BODY_BYTES} bytes.")
    if not raw:
        return error(400, "invalid_json", "The body is empty; send the webhook payload as JSON.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return error(400, "invalid_json", f"The body is not valid JSON: {exc}")
