"""Cloud Monitoring: the attempt's structured log line, the log-based metrics that read it and the
dashboard that charts them, all created or updated in place by the deploy plan (dry run)."""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sona.errors import TransientError
from sona.job.pipeline import ATTEMPT_EVENT
from sona.logs import setup_logging
from sona.ops.monitoring import DASHBOARD_FILE, DASHBOARD_NAME, RETRY_NEW_METRIC, metric_files
from tests.test_deploy import deploy_settings, dry_run
from tests.test_pipeline import FakeProvider, claimed, run

EXTRACT = re.compile(r"^EXTRACT\(jsonPayload\.([\w.]+)\)$")


def metrics() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in metric_files()}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def attempt_lines(**run_args: Any) -> list[dict[str, Any]]:
    """The JSON lines Cloud Logging would receive (StructuredLogHandler) for one attempt."""
    out = io.StringIO()
    setup_logging("info", fmt="json", stream=out)
    run(**run_args)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in lines if line.get("event") == ATTEMPT_EVENT]


def extracted(payload: dict[str, Any], extractor: str) -> Any:
    match = EXTRACT.match(extractor)
    assert match, extractor
    value: Any = payload
    for key in match.group(1).split("."):
        value = value[key]
    return value


@pytest.mark.usefixtures("restore_logging")
def test_a_completed_attempt_feeds_every_metric() -> None:
    created = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    (payload,) = attempt_lines(job=claimed(created_at=created, started_at=created + timedelta(seconds=2)))
    assert payload["message"].startswith("attempt completed in ")
    for name, metric in metrics().items():
        assert metric["filter"].startswith(f'jsonPayload.event="{ATTEMPT_EVENT}"'), name
        for extractor in [metric.get("valueExtractor"), *metric.get("labelExtractors", {}).values()]:
            if extractor:
                assert extracted(payload, extractor) is not None, (name, extractor)
    assert extracted(payload, metrics()["sona_queue_wait"]["valueExtractor"]) == 2000


@pytest.mark.usefixtures("restore_logging")
def test_a_failed_attempt_is_counted_with_its_class() -> None:
    (payload,) = attempt_lines(job=claimed(), provider=FakeProvider(error=TransientError("busy")))
    labels = metrics()["sona_attempts"]["labelExtractors"]
    assert extracted(payload, labels["outcome"]) == "retrying"
    assert extracted(payload, labels["outcome_class"]) == "provider_transient"


def test_latencies_are_distribution_metrics_in_milliseconds() -> None:
    for name, metric in metrics().items():
        kind = metric["metricDescriptor"]["valueType"]
        if name == "sona_attempts":
            assert (kind, metric["metricDescriptor"]["metricKind"]) == ("INT64", "DELTA")
            continue
        assert (kind, metric["metricDescriptor"]["unit"]) == ("DISTRIBUTION", "ms"), name
        assert "exponentialBuckets" in metric["bucketOptions"], name
        assert set(metric.get("labelExtractors", {})) == {
            label["key"] for label in metric["metricDescriptor"].get("labels", [])
        }


def test_the_dashboard_charts_the_four_figures_from_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["displayName"] == DASHBOARD_NAME
    widgets = [tile["widget"] for tile in dashboard["mosaicLayout"]["tiles"]]
    titles = [w["title"] for w in widgets]
    for figure in ("Jobs completed per minute", "Queue wait", "Provider response time", "by class"):
        assert any(figure in title for title in titles), figure
    charted = set(re.findall(r"logging\.googleapis\.com/user/(\w+)", json.dumps(dashboard)))
    assert charted == set(metrics())


def plan_lines() -> list[str]:
    return dry_run(deploy_settings()).splitlines()


def test_the_deploy_plan_creates_each_metric_once_and_updates_it_in_place_after() -> None:
    lines = plan_lines()
    for name in metrics():
        config = f"--config-from-file=monitoring/metrics/{name}.json"
        check = lines.index(next(line for line in lines if f"logging metrics describe {name} " in line))
        update, _, create = (shlex.split(line) for line in lines[check + 1 : check + 4])
        assert update[:5] == ["gcloud", "logging", "metrics", "update", name]
        assert create[:5] == ["gcloud", "logging", "metrics", "create", name]
        assert config in update and config in create


def test_the_deploy_plan_creates_the_dashboard_once_and_updates_it_in_place_after() -> None:
    lines = plan_lines()
    found = next(i for i, line in enumerate(lines) if "monitoring dashboards list" in line)
    assert f'displayName="{DASHBOARD_NAME}"' in lines[found]
    branch = lines[found + 1 : lines.index("fi", found)]
    update = next(shlex.split(li) for li in branch if "dashboards update" in li)
    create = next(shlex.split(li) for li in branch if "dashboards create" in li)
    # each write waits while its new metric types are unknown to Monitoring
    assert update[:6] == [
        RETRY_NEW_METRIC,
        "gcloud",
        "monitoring",
        "dashboards",
        "update",
        "${SONA_DASHBOARD}",
    ]
    assert "--config-from-file=${SONA_DASHBOARD_FILE}" in update  # the file plus the current etag
    assert any('dashboards describe "${SONA_DASHBOARD}"' in li and "value(etag)" in li for li in branch)
    assert create[:5] == [RETRY_NEW_METRIC, "gcloud", "monitoring", "dashboards", "create"]
    assert "--config-from-file=monitoring/dashboard.json" in create
    # validated before anything is written, and the metrics the dashboard charts exist before it
    validate = next(i for i, line in enumerate(lines) if "dashboards create --validate-only" in line)
    last_metric = max(i for i, line in enumerate(lines) if "logging metrics create" in line)
    assert last_metric < validate < found
