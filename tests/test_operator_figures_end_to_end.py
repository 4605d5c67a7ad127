"""A mixed run through real processes (relay, Cloud Tasks, functions-framework, gateway, ffmpeg):
jobs that complete, fail for good, are retried after each class of failure, one whose process
crashed, and one that met an account-level refusal (which pauses the service instead of failing an
attempt); then `python -m sona stats --json` must give every figure of that known mix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour
from devstack.stack import LocalStack
from tests.support import RELAY_PAUSE_S, sql, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STORAGE_FAULT = {"statusCode": "500", "error": "internal", "message": "Internal Server Error"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    # No retries inside an attempt, so one scripted failure ends the attempt with its class.
    env = {"RETRY_DELAY_MS": "50", "MAX_RETRIES": "0", "MAX_ATTEMPTS": "3"}
    with LocalStack(
        tmp_path_factory.mktemp("figures"),
        env=env,
        process_env={"PATH": "/usr/bin:/bin"},
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
    ) as s:
        yield s


def run_job(stack: LocalStack, prompt: str) -> dict[str, Any]:
    row = stack.wait_for(stack.insert_job(prompt, duration=1), timeout_s=60)
    assert row["status"] in ("completed", "failed"), row
    return row


def crashed_job(stack: LocalStack) -> dict[str, Any]:
    """A job whose first attempt's process died: claimed, then its lease ran out; reclaim retries it."""
    assert stack.relay is not None
    stack.relay.enabled = False  # the claim below stands in for the delivery
    job_id = stack.insert_job("crashed mid-job", duration=1)
    sql(stack.database_url, "select claim_job(%s, %s, 60, 3)", job_id, uuid.uuid4(), role=None)
    sql(
        stack.database_url,
        "update jobs set lease_expires_at = now() - interval '5 seconds' where id = %s",
        job_id,
        role=None,
    )
    stack.relay.enabled = True
    response = requests.post(
        stack.reclaim_jobs_url, headers={"X-Webhook-Secret": stack.webhook_secret}, timeout=60
    )
    assert response.status_code == 200, response.text
    return stack.wait_for(job_id, timeout_s=60)


def paused_then_probed(stack: LocalStack) -> dict[str, Any]:
    """An account-level refusal pauses the service and gives the attempt back; once the pause is
    over, reclaim's probe runs the job again."""
    job_id = stack.insert_job("account refused once", duration=1)
    wait_until(lambda: bool(sql(stack.database_url, "select 1 from sona_pauses", role=None)), 30)
    assert stack.wait_for(job_id, ("pending",), timeout_s=30)["status"] == "pending"
    # Time passes and the account is fixed: the pause ends.
    sql(
        stack.database_url,
        "update sona_pauses set until = now(); update jobs set run_after = null",
        role=None,
    )
    response = requests.post(
        stack.reclaim_jobs_url, headers={"X-Webhook-Secret": stack.webhook_secret}, timeout=60
    )
    assert response.status_code == 200, response.text
    row = stack.wait_for(job_id, timeout_s=60)
    assert row["attempts"] == 1  # the paused attempt was given back
    return row


@pytest.fixture(scope="module")
def mixed_run(stack: LocalStack) -> dict[str, Any]:
    """Seven jobs, one after another so each scripted answer meets its job."""
    assert stack.double is not None
    statuses = [run_job(stack, "plain one")["status"], run_job(stack, "plain two")["status"]]
    stack.double.script(Behaviour("error", 400))  # provider permanent
    statuses.append(run_job(stack, "refused for good")["status"])
    stack.double.script(Behaviour("error", 503))  # provider transient, then it works
    statuses.append(run_job(stack, "busy once")["status"])
    stack.double.script(Behaviour("html403"))  # the provider's edge refuses the account, once
    statuses.append(paused_then_probed(stack)["status"])
    stack.gateway.faults.add("storage:upload", 500, STORAGE_FAULT)  # storage, then it works
    statuses.append(run_job(stack, "storage failed once")["status"])
    statuses.append(crashed_job(stack)["status"])  # timeout, then it works
    assert statuses == ["completed", "completed", "failed"] + ["completed"] * 4
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "SUPABASE_URL": stack.gateway.url,
        "SUPABASE_SERVICE_ROLE_KEY": stack.service_role_key,
        "STABLE_AUDIO_API_KEY": "unused-by-stats",
        "WEBHOOK_SECRET": "unused-by-stats",
    }
    result = subprocess.run(
        [sys.executable, "-m", "sona", "stats", "--json", "--hours", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_stats_counts_the_jobs_of_the_mix(mixed_run: dict[str, Any]) -> None:
    assert (mixed_run["total"], mixed_run["by_status"]) == (7, {"completed": 6, "failed": 1})
    assert mixed_run["failure_rate"] == pytest.approx(1 / 7, abs=1e-4)
    assert mixed_run["throughput"]["completed"] == 6
    assert mixed_run["throughput"]["per_minute"] == 0.1  # 6 in a 60-minute window
    assert 1 <= mixed_run["throughput"]["busiest_minute"]["completed"] <= 6


def test_stats_classes_each_failed_attempt_of_the_mix(mixed_run: dict[str, Any]) -> None:
    # 7 first attempts and 3 retries ended; one failure of each class an attempt can fail by.
    attempts = mixed_run["attempts"]
    assert attempts["ended"] == 10
    assert {kind: entry["count"] for kind, entry in attempts["failed_by_class"].items()} == {
        "provider_permanent": 1,
        "provider_transient": 1,
        "storage": 1,
        "timeout": 1,
    }
    # the account-level refusal failed no attempt: it shows as a pause
    assert (mixed_run["spend"]["pauses_in_window"], mixed_run["spend"]["jobs_released_by_outages"]) == (1, 1)


def test_stats_gives_provider_and_storage_rates_of_the_mix(mixed_run: dict[str, Any]) -> None:
    provider, storage = mixed_run["provider"], mixed_run["storage"]
    # every recorded attempt but the crashed one called the provider; two failed there
    assert (provider["calls"], provider["errors"]) == (9, 2)
    assert provider["error_rate"] == pytest.approx(2 / 9, abs=1e-3)
    # six attempts stored both files; one attempt's upload failed
    assert (storage["stored"], storage["failed"]) == (6, 1)
    assert storage["success_rate"] == pytest.approx(6 / 7, abs=1e-4)
    assert mixed_run["retries"] == {"per_job": pytest.approx(3 / 7, abs=1e-3), "max": 1, "jobs_retried": 3}


def test_stats_gives_every_latency_of_the_mix(mixed_run: dict[str, Any]) -> None:
    for figure, low, high in (
        ("queue_wait_s", "p50", "p95"),
        ("processing_s", "p50", "p95"),
        ("provider", "p50_s", "p95_s"),
    ):
        values = mixed_run[figure]
        assert 0 <= values[low] <= values[high] < 60, (figure, values)
    assert 0 <= mixed_run["storage"]["upload_p95_s"] < 60
