"""Logging: structured JSON on Cloud Functions (google-cloud-logging), one readable line locally.

Every line logged inside a job carries its job id and attempt; no secret value reaches any line.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_job: ContextVar[dict[str, Any] | None] = ContextVar("sona_job", default=None)
_HANDLER_NAME = "sona"
REDACTED = "[redacted]"


@contextmanager
def job_context(job_id: uuid.UUID | str, attempt: int | None = None) -> Iterator[None]:
    token = _job.set({"job_id": str(job_id), "attempt": attempt})
    try:
        yield
    finally:
        _job.reset(token)


def set_attempt(attempt: int) -> None:
    current = _job.get()
    if current is not None:
        _job.set({**current, "attempt": attempt})


class JobFields(logging.Filter):
    """Puts the job id and attempt on the record (and in json_fields for Cloud Logging)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _job.get() or {}
        record.job_id = fields.get("job_id") or "-"
        record.attempt = fields.get("attempt") if fields.get("attempt") is not None else "-"
        if fields:
            extra = getattr(record, "json_fields", None) or {}
            record.json_fields = {**fields, **extra}
        return True


class Redact(logging.Filter):
    """Replaces every secret value in the message, its arguments and any traceback."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            message = f"{message}\n{''.join(traceback.format_exception(*record.exc_info)).rstrip()}"
            record.exc_info = None
            record.exc_text = None
        record.msg = self.scrub(message)
        record.args = None
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, dict):
            record.json_fields = {k: self.scrub(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


def on_cloud_functions() -> bool:
    return bool(os.environ.get("K_SERVICE"))


def setup_logging(
    level: str = "info", secrets: Iterable[str] = (), *, fmt: str | None = None, stream: Any = None
) -> logging.Handler:
    """Install the one handler on the root logger (again: replace it). fmt: json, text or auto."""
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "auto").lower()
    use_json = fmt == "json" or (fmt == "auto" and on_cloud_functions())
    handler = _json_handler(stream) if use_json else _text_handler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(JobFields())
    handler.addFilter(Redact(secrets))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "hpack", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler


def _text_handler(stream: Any) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [job %(job_id)s #%(attempt)s] %(message)s")
    )
    return handler


def _json_handler(stream: Any) -> logging.Handler:
    # Imported only here: google-cloud-logging is heavy and only the Cloud Functions path needs it.
    import google.cloud.logging_v2 as cloud_logging
    from google.cloud.logging_v2.handlers import StructuredLogHandler

    cloud_logging._instrumentation_emitted = True  # no diagnostic line before ours
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCP_PROJECT")
    return StructuredLogHandler(project_id=project, stream=stream or sys.stdout)  # type: ignore[no-untyped-call]
