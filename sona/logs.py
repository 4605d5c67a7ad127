"""Logging: structured JSON on Cloud Functions, one readable line locally.

Every line logged inside a job carries its job id and attempt; no secret value reaches any line.

The JSON lines are Cloud Logging's structured-logging shape (Cloud Logging, "Structured logging":
a line of JSON on stdout whose special fields become the entry's severity, trace, span, labels and
source location), the same object google-cloud-logging's StructuredLogHandler writes, field for
field (tests/test_logging.py holds them side by side). Written here with the standard library
because that handler's import (google-cloud-logging, api-core, grpc, protobuf) was most of a cold
start on Cloud Functions; the package is now only a test dependency.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
    handler = logging.StreamHandler(stream or sys.stdout)
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCP_PROJECT")
    handler.setFormatter(StructuredLines(project))
    return handler


# Fields Cloud Logging reads from a structured line itself; a record's own fields never override them.
SPECIAL_FIELDS = frozenset(
    {
        "severity",
        "httpRequest",
        "time",
        "timestamp",
        "timestampSeconds",
        "timestampNanos",
        "logging.googleapis.com/insertId",
        "logging.googleapis.com/labels",
        "logging.googleapis.com/operation",
        "logging.googleapis.com/sourceLocation",
        "logging.googleapis.com/spanId",
        "logging.googleapis.com/trace",
        "logging.googleapis.com/trace_sampled",
    }
)
# W3C trace context: version-trace_id-parent_id-flags (https://www.w3.org/TR/trace-context/).
_TRACEPARENT = re.compile(
    r"^\s?(?!ff)[0-9a-f]{2}-((?![0]{32})[0-9a-f]{32})-((?![0]{16})[0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s?$"
)
# Google's legacy header: TRACE_ID[/SPAN_ID][;o=OPTIONS], the span id in decimal.
_CLOUD_TRACE = re.compile(r"([\w-]+)?(/?([\w-]+))?(;?o=(\d))?")


class Trace:
    """The request's trace, from `traceparent` first, else `X-Cloud-Trace-Context`."""

    def __init__(
        self, trace_id: str | None = None, span_id: str | None = None, sampled: bool = False
    ) -> None:
        self.trace_id, self.span_id, self.sampled = trace_id, span_id, sampled

    @classmethod
    def from_headers(cls, traceparent: str | None, cloud_trace: str | None) -> Trace:
        match = _TRACEPARENT.match(traceparent or "")
        if match:
            return cls(match.group(1), match.group(2), bool(int(match.group(3), 16) & 1))
        match = _CLOUD_TRACE.match(cloud_trace or "")
        if not cloud_trace or match is None:
            return cls()
        span: str | None = None
        if match.group(3) and match.group(3).isdigit() and 0 < int(match.group(3)) < 2**64:
            span = f"{int(match.group(3)):016x}"
        return cls(match.group(1), span, match.group(5) == "1")


def _request() -> tuple[dict[str, Any], Trace]:
    """The Flask request being served, if any (functions-framework has imported Flask already)."""
    if "flask" not in sys.modules:
        return {}, Trace()
    from flask import has_request_context, request

    if not has_request_context():
        return {}, Trace()
    http = {
        "requestMethod": request.method,
        "requestUrl": request.url,
        "userAgent": request.user_agent.string,
        "protocol": request.environ.get("SERVER_PROTOCOL"),
    }
    return http, Trace.from_headers(
        request.headers.get("traceparent"), request.headers.get("X-Cloud-Trace-Context")
    )


class StructuredLines(logging.Formatter):
    """One JSON object per record: the message and the record's json_fields, then Cloud Logging's
    special fields (severity from the level, the trace as projects/P/traces/T when the project is
    known, the span, whether it was sampled, the python_logger label, the source location and the
    request)."""

    def __init__(self, project: str | None) -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields = getattr(record, "json_fields", None)
        entry: dict[str, Any] = {}
        if isinstance(fields, dict) and fields:
            entry.update((k, v) for k, v in fields.items() if k not in SPECIAL_FIELDS)
            if message != "None":
                entry["message"] = message
        elif message and message != "None":
            entry["message"] = message
        http, trace = _request()
        trace_name = trace.trace_id or ""
        if trace.trace_id and self.project:
            trace_name = f"projects/{self.project}/traces/{trace.trace_id}"
        labels = getattr(record, "labels", None)
        entry.update(
            {
                "severity": record.levelname,
                "logging.googleapis.com/labels": {
                    "python_logger": record.name,
                    **(labels if isinstance(labels, dict) else {}),
                },
                "logging.googleapis.com/trace": trace_name,
                "logging.googleapis.com/spanId": trace.span_id or "",
                "logging.googleapis.com/trace_sampled": trace.sampled,
                "logging.googleapis.com/sourceLocation": {
                    "line": record.lineno,
                    "file": record.pathname,
                    "function": record.funcName,
                },
                "httpRequest": http,
            }
        )
        return json.dumps(entry, ensure_ascii=False, default=str)
