"""End to end through real processes: embedded PostgreSQL, the gateway, the webhook relay, both
functions under functions-framework, ffmpeg, and the Stable Audio double."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour
from devstack.emulators.storage_api import FREE_PLAN_UPLOAD_LIMIT
from devstack.stack import LocalStack
from tests.support import RELAY_PAUSE_S, decoded_seconds, sql, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    with LocalStack(
        tmp_path_factory.mktemp("stack"),
        env={"RETRY_DELAY_MS": "50"},
        process_env={"PATH": "/usr/bin:/bin"},
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
        reclaim_function=False,  # no test here calls reclaim_jobs
    ) as s:
        yield s


@pytest.fixture(autouse=True)
def fresh_double(stack: LocalStack) -> None:
    assert stack.double is not None
    stack.double.reset()
    assert stack.relay is not None
    stack.relay.wait_idle()  # an earlier test's dropped deliveries are dropped by now
    stack.relay.enabled = True


def response_of(stack: LocalStack, request_id: int) -> list[dict[str, Any]]:
    """pg_net's record of a webhook call, found as Supabase links it: through its hooks row."""
    return sql(
        stack.database_url,
        "select r.status_code, r.timed_out from supabase_functions.hooks h"
        " join net._http_response r on r.id = h.request_id where h.request_id = %s",
        request_id,
        role=None,
    )


def seconds_of(url: str, suffix: str) -> float:
    return decoded_seconds(requests.get(url, timeout=10).content, suffix)


def test_an_inserted_job_is_delivered_generated_stored_and_completed(stack: LocalStack) -> None:
    job_id = stack.insert_job("ambient forest at dawn", duration=4, quality="low")
    row = stack.wait_for(job_id, timeout_s=60)
    assert row["status"] == "completed", row["error_message"]
    assert row["result_url"] == row["mp3_url"]
    assert row["completed_at"] is not None
    assert round(seconds_of(row["wav_url"], "wav"), 2) == 4.0
    assert round(seconds_of(row["mp3_url"], "mp3"), 2) == 4.0
    assert stack.double is not None and stack.double.paid_generations == 1
    assert stack.relay is not None
    (request,) = stack.relay.requests_for(job_id)
    wait_until(lambda: bool(response_of(stack, request.id)))  # written when its batch commits
    (response,) = response_of(stack, request.id)
    # the webhook only enqueued (202); a task ran the job
    assert (response["status_code"], response["timed_out"]) == (202, False)
    body = request.json_body()
    assert (body["type"], body["table"], body["schema"], body["old_record"]) == (
        "INSERT",
        "jobs",
        "public",
        None,
    )
    assert body["record"]["id"] == str(job_id)


def test_a_free_plan_project_completes_a_job_with_the_default_storage_settings(stack: LocalStack) -> None:
    # The stack's Storage has the Free plan's 50 MB global limit, which refuses a 100 MB bucket.
    assert stack.gateway.storage.upload_limit == FREE_PLAN_UPLOAD_LIMIT
    job_id = stack.insert_job("free plan", duration=2, quality="low")
    row = stack.wait_for(job_id, timeout_s=60)
    assert row["status"] == "completed", row["error_message"]
    buckets = sql(
        stack.database_url,
        "select id, file_size_limit from storage.buckets where id = 'audio-files'",
        role=None,
    )
    assert buckets == [{"id": "audio-files", "file_size_limit": None}]


def test_fifty_simultaneous_deliveries_make_one_provider_call(stack: LocalStack) -> None:
    assert stack.relay is not None and stack.double is not None
    stack.relay.enabled = False  # take the payload the database built, then deliver it 50 times
    job_id = stack.insert_job("fifty at once", duration=2)
    wait_until(lambda: bool(stack.relay and stack.relay.requests_for(job_id)))
    (request,) = stack.relay.requests_for(job_id)
    payload = {"body": request.json_body(), "headers": request.headers}
    barrier = threading.Barrier(50)
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def deliver() -> None:
        barrier.wait()
        response = requests.post(
            stack.process_job_url, data=json.dumps(payload["body"]), headers=payload["headers"], timeout=60
        )
        with lock:
            answers.append(response.json())

    threads = [threading.Thread(target=deliver) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    outcomes = sorted(a["outcome"] for a in answers)
    assert outcomes == ["already_enqueued"] * 49 + ["enqueued"]  # one task, whatever the deliveries
    assert stack.wait_for(job_id, timeout_s=30)["status"] == "completed"
    assert stack.double.call_count == 1


def test_a_moderated_prompt_ends_failed_after_one_call(stack: LocalStack) -> None:
    assert stack.double is not None
    stack.double.script(Behaviour("error", 403))
    job_id = stack.insert_job("something the moderation flags", duration=2)
    row = stack.wait_for(job_id, timeout_s=30)
    assert row["status"] == "failed"
    assert "content moderation" in row["error_message"]
    assert stack.double.call_count == 1


def test_a_bad_request_to_the_real_server_gets_a_json_error(stack: LocalStack) -> None:
    response = requests.post(stack.process_job_url, json={"type": "INSERT"}, timeout=10)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    response = requests.get(stack.process_job_url, timeout=10)
    assert response.status_code == 405


def run_demo(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m devstack demo ...` with no key, no ffmpeg on PATH and an empty home."""
    return subprocess.run(
        [sys.executable, "-m", "devstack", "demo", *args],
        cwd=Path(__file__).resolve().parents[1],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_completes_with_no_keys_and_no_network(tmp_path: Path) -> None:
    """The README's first command: the plug-in's flow, and what the musician gets."""
    result = run_demo(tmp_path, "ambient forest at dawn", "--duration", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "offline synthesiser (not Stable Audio)" in result.stdout
    assert (
        "Inserted designer job" in result.stdout and "as the plug-in's generate does (queued" in result.stdout
    )
    assert "Tokens: this database has none of the plug-in's token tables; nothing charged" in result.stdout
    assert "Mode:        designer" in result.stdout
    assert "Prompt sent: 'ambient forest at dawn. very short'" in result.stdout
    preview = re.search(r"Preview: +(generated/\S+\.mp3) \((\d+\.\d) s\)", result.stdout)
    assert preview is not None and float(preview.group(2)) == 5.0
    on_disk = re.findall(r"(/\S+\.(?:mp3|wav))", result.stdout.split("On disk:", 1)[1])
    assert [Path(p).suffix for p in on_disk] == [".mp3", ".wav"]
    assert all(Path(p).stat().st_size > 0 for p in on_disk) and on_disk[0].endswith(preview.group(1))


def test_demo_json_prints_the_whole_finished_row(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "ambient forest at dawn", "--duration", "5", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    row = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert (row["mode"], row["status"], row["duration"]) == ("designer", "completed", 5)
    assert row["preview_path"].endswith(".mp3") and row["enhanced_prompt"] and row["filename"]


def test_demo_runs_the_earlier_workers_flow_one_flag_away(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "ambient forest at dawn", "--duration", "5", "--earlier-worker")
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"mode": "default"' in result.stdout
    assert '"status": "completed"' in result.stdout
    assert "WAV: http://127.0.0.1" in result.stdout


def test_demo_exits_non_zero_with_the_jobs_error_when_it_fails(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "   ")
    assert result.returncode == 1
    assert "Job failed: The prompt is empty. Describe the sound you want." in result.stderr


def test_demo_refuses_a_duration_outside_1_to_380_before_starting(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "x", "--duration", "381")
    assert result.returncode == 2
    assert "must be 1 to 380 seconds, not 381" in result.stderr


def test_a_job_completes_with_a_secret_key_sent_only_as_apikey(tmp_path: Path, pg_server: str) -> None:
    with LocalStack(
        tmp_path,
        function_key="secret",
        process_env={"PATH": "/usr/bin:/bin"},
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
        reclaim_function=False,
    ) as stack:
        job_id = stack.insert_job("rain on a tin roof", duration=2, quality="low")
        row = stack.wait_for(job_id, timeout_s=60)
        seen = list(stack.gateway.seen_headers)
    assert row["status"] == "completed", row["error_message"]
    routes = {route for route, _ in seen}
    assert {"rpc:claim_job", "storage:bucket_get", "storage:upload", "rpc:complete_job"} <= routes
    assert all(h.get("apikey") == stack.secret_key and "authorization" not in h for _, h in seen)
