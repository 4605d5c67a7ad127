"""Logging: structured JSON lines on the Cloud Functions path (the fields google-cloud-logging's
StructuredLogHandler writes, without importing it), readable lines locally, job fields on every job
line, no secret anywhere."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour, StableAudioDouble
from devstack.emulators.gateway import Gateway
from devstack.stack import FunctionProcess
from sona.logs import StructuredLines, job_context, setup_logging
from sona.models import webhook_payload
from tests.support import SECRETS, insert_job

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_secret_is_redacted_from_messages_arguments_and_tracebacks(fmt: str) -> None:
    out = io.StringIO()
    setup_logging("info", SECRETS.values(), fmt=fmt, stream=out)
    log = logging.getLogger("sona.test")
    with job_context(uuid.UUID(int=7), attempt=2):
        log.info("calling with key %s", SECRETS["stable_audio_api_key"])
        try:
            raise RuntimeError(f"boom {SECRETS['webhook_secret']}")
        except RuntimeError:
            log.exception("failed")
    text = out.getvalue()
    assert not any(secret in text for secret in SECRETS.values())
    assert text.count("[redacted]") >= 2
    assert "00000000-0000-0000-0000-000000000007" in text


@pytest.mark.usefixtures("restore_logging")
def test_log_level_filters_in_both_formats() -> None:
    for fmt in ("json", "text"):
        out = io.StringIO()
        setup_logging("warning", fmt=fmt, stream=out)
        logging.getLogger("sona.test").info("hidden")
        logging.getLogger("sona.test").warning("shown")
        assert "hidden" not in out.getvalue()
        assert "shown" in out.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_local_lines_are_readable_single_lines_with_the_job() -> None:
    out = io.StringIO()
    setup_logging("info", fmt="text", stream=out)
    with job_context("job-1", attempt=3):
        logging.getLogger("sona.job.pipeline").info("stored")
    line = out.getvalue().strip()
    assert line.endswith("INFO    sona.job.pipeline [job job-1 #3] stored")


def google_line(record: logging.LogRecord, project: str | None) -> dict[str, Any]:
    """What google-cloud-logging's StructuredLogHandler writes for the record."""
    import google.cloud.logging_v2 as cloud_logging
    from google.cloud.logging_v2.handlers import StructuredLogHandler

    cloud_logging._instrumentation_emitted = True  # no diagnostic line first
    out = io.StringIO()
    handler = StructuredLogHandler(project_id=project, stream=out)  # type: ignore[no-untyped-call]
    handler.handle(logging.makeLogRecord(record.__dict__))
    return dict(json.loads(out.getvalue()))


def our_line(record: logging.LogRecord, project: str | None) -> dict[str, Any]:
    return dict(json.loads(StructuredLines(project).format(logging.makeLogRecord(record.__dict__))))


def a_record(level: int, message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.getLogger("sona.job.pipeline").makeRecord(
        "sona.job.pipeline", level, "/srv/sona/pipeline.py", 42, message, args, None, "run", extra
    )
    return record


RECORDS = {
    "plain": a_record(logging.INFO, "claimed (attempt %d)", 1),
    "job fields": a_record(logging.WARNING, "retrying", json_fields={"job_id": "j-1", "attempt": 2}),
    "attempt line": a_record(
        logging.INFO,
        "attempt completed in 1.2 s",
        json_fields={"event": "sona_attempt", "outcome": "completed", "timings_ms": {"total": 1200}},
    ),
    "error with labels": a_record(logging.ERROR, "paused", labels={"cause": "credits"}),
    "special fields are not overridden": a_record(
        logging.INFO, "x", json_fields={"severity": "DEBUG", "k": 1}
    ),
}
HEADERS = {
    "traceparent": {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"},
    "traceparent not sampled": {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-00"},
    "X-Cloud-Trace-Context": {"X-Cloud-Trace-Context": f"{TRACE}/12345;o=1"},
    "no trace": {},
}


@pytest.mark.parametrize("record", RECORDS, ids=list(RECORDS))
@pytest.mark.parametrize("headers", HEADERS, ids=list(HEADERS))
@pytest.mark.parametrize("project", ["sona-prod", None])
def test_json_lines_carry_the_same_fields_as_google_cloud_loggings_handler(
    record: str, headers: str, project: str | None
) -> None:
    app = flask.Flask(__name__)
    with app.test_request_context(
        "/", method="POST", headers={"User-Agent": "Google-Cloud-Tasks", **HEADERS[headers]}
    ):
        assert our_line(RECORDS[record], project) == google_line(RECORDS[record], project)


def test_json_lines_outside_a_request_match_too() -> None:
    for record in RECORDS.values():
        assert our_line(record, "sona-prod") == google_line(record, "sona-prod")


def test_the_json_path_imports_no_google_cloud_package(tmp_path: Path) -> None:
    probe = (
        "import io, logging, sys; from sona.logs import setup_logging; "
        "setup_logging('info', fmt='json', stream=io.StringIO()); logging.getLogger('x').info('hi'); "
        "heavy = ('google.cloud.logging', 'google.api_core', 'google.protobuf', 'grpc'); "
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_one_job_on_the_cloud_functions_path_logs_only_json_with_job_fields_and_trace(
    gateway: Gateway, double: StableAudioDouble, db_url: str, tmp_path: Path
) -> None:
    double.script(Behaviour("error", 503))  # one retry, so a warning line is logged too
    env = {
        "PATH": os.environ["PATH"],
        "K_SERVICE": "process-job",
        "GOOGLE_CLOUD_PROJECT": "sona-prod",
        "SUPABASE_URL": gateway.url,
        "SUPABASE_SERVICE_ROLE_KEY": gateway.service_role_key,
        "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
        "STABLE_AUDIO_API_URL": double.url,
        "WEBHOOK_SECRET": SECRETS["webhook_secret"],
        "RETRY_DELAY_MS": "20",
        "LOG_LEVEL": "debug",
        "DISPATCH": "direct",
    }
    function = FunctionProcess("process_job", env, tmp_path / "process_job.log").wait_ready()
    try:
        job_id = insert_job(db_url, duration=1)
        response = requests.post(
            function.url,
            timeout=60,
            json=webhook_payload(job_id),
            headers={
                "X-Webhook-Secret": SECRETS["webhook_secret"],
                "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
            },
        )
        assert response.json().get("outcome") == "completed", (response.status_code, response.text)
    finally:
        function.stop()
    output = function.output()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    job_lines = [line for line in lines if line.get("job_id")]
    assert len(job_lines) >= 4
    assert len(lines) == len(output.strip().splitlines())  # every line is JSON
    for line in job_lines:
        assert line["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR")
        assert line["job_id"] == str(job_id)
        assert line["logging.googleapis.com/trace"] == f"projects/sona-prod/traces/{TRACE}"
    assert {line["attempt"] for line in job_lines} - {None} == {1}
    assert any(line["severity"] == "WARNING" for line in job_lines)
    assert not any(secret in output for secret in [*SECRETS.values(), gateway.service_role_key])
