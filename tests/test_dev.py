"""`python -m devstack dev --json`: the local stack for other tools, described in one JSON line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import requests

from devstack.emulators.gateway import make_jwt
from devstack.stack import LocalStack, free_port
from sona.models import webhook_payload

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_dev_prints_one_json_line_that_drives_the_stack_and_stops_on_sigint() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack", "dev", "--json", "--process-job-port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO / ".sona")},
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert set(info) >= {
            "supabase_url",
            "service_role_key",
            "anon_key",
            "secret_key",
            "publishable_key",
            "database_url",
            "webhook_secret",
            "process_job_url",
            "reclaim_jobs_url",
            "dispatch",
            "cloud_tasks_url",
            "user_id",
            "user_token",
            "user_email",
            "user_password",
            "functions_url",
        }
        assert info["process_job_url"] == f"http://127.0.0.1:{port}"
        key = info["service_role_key"]
        answer = requests.post(
            f"{info['supabase_url']}/rest/v1/rpc/job_stats",
            json={"p_window_hours": 1},
            headers={"apikey": key, "Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert answer.json()["total"] == 0
        as_publishable = requests.post(
            f"{info['supabase_url']}/rest/v1/rpc/job_stats",
            json={"p_window_hours": 1},
            headers={"apikey": info["publishable_key"]},
            timeout=10,
        )
        assert as_publishable.json()["code"] == "42501"  # anon may not read the figures
        # As in production, the webhook enqueues a task; the task finds nothing to claim.
        enqueued = requests.post(
            info["process_job_url"],
            headers={"X-Webhook-Secret": info["webhook_secret"]},
            json=webhook_payload("00000000-0000-0000-0000-000000000000"),
            timeout=10,
        )
        assert (enqueued.status_code, enqueued.json()["outcome"]) == (202, "enqueued")
        assert (info["dispatch"], info["cloud_tasks_url"][:7]) == ("cloud_tasks", "http://")
        # A client acts as the signed-in local user with the publishable key and the user's token.
        as_user = {"apikey": info["publishable_key"], "Authorization": f"Bearer {info['user_token']}"}
        inserted = requests.post(
            f"{info['supabase_url']}/rest/v1/jobs",
            json={"user_id": info["user_id"], "prompt": "dev user", "duration": 1},
            headers={**as_user, "Prefer": "return=representation"},
            timeout=10,
        )
        assert (inserted.status_code, inserted.json()[0]["user_id"]) == (201, info["user_id"])
        cancelled = requests.post(
            f"{info['supabase_url']}/rest/v1/rpc/cancel_job",
            json={"p_job_id": inserted.json()[0]["id"]},
            headers=as_user,
            timeout=10,
        )
        assert cancelled.status_code == 200
        # The user signs in again as supabase-js's signInWithPassword does, and polls their job.
        session = requests.post(
            f"{info['supabase_url']}/auth/v1/token?grant_type=password",
            json={"email": info["user_email"], "password": info["user_password"]},
            headers={"apikey": info["publishable_key"]},
            timeout=10,
        ).json()
        polled = requests.get(
            f"{info['supabase_url']}/rest/v1/jobs?select=id,status&id=eq.{inserted.json()[0]['id']}",
            headers={
                "apikey": info["publishable_key"],
                "Authorization": f"Bearer {session['access_token']}",
                "Accept": "application/vnd.pgrst.object+json",
            },
            timeout=10,
        )
        assert polled.json() == {"id": inserted.json()[0]["id"], "status": "cancelled"}
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def run_sona(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """As scripts/run.py routes it: the local world's dev to devstack, validate to sona."""
    package = "devstack" if command[0] == "dev" else "sona"
    return subprocess.run(
        [sys.executable, "-m", package, *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_dev_with_an_invalid_configuration_lists_what_validate_lists_and_starts_nothing() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(REPO / ".sona"),
        "SUPABASE_URL": "http://127.0.0.1:9",
        "SUPABASE_SERVICE_ROLE_KEY": make_jwt("a-local-secret", "service_role"),
        "STABLE_AUDIO_API_KEY": "sk-unused",
        "WEBHOOK_SECRET": "unused-secret",
        "JOB_TIMEOUT_MS": "20000",
        "DEADLINE_MARGIN_MS": "10000",  # not less than half of JOB_TIMEOUT_MS
    }
    ports = [free_port() for _ in range(3)]
    flags = ["--gateway-port", "--process-job-port", "--reclaim-jobs-port"]
    dev = run_sona(["dev", *[a for pair in zip(flags, map(str, ports), strict=True) for a in pair]], env)
    validate = run_sona(["validate"], env)
    assert (dev.returncode, validate.returncode) == (1, 1)
    assert "DEADLINE_MARGIN_MS must be less than half of JOB_TIMEOUT_MS" in validate.stderr
    assert dev.stderr == validate.stderr
    for port in ports:  # nothing it would have started is listening
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_stack_that_fails_to_start_stops_what_it_had_started(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        stack = LocalStack(tmp_path, ports={"gateway": taken.getsockname()[1]}, start_functions=False)
        with pytest.raises(SystemExit):  # werkzeug's answer to a port in use
            stack.start()
    assert stack.database_url  # PostgreSQL had started ...
    with pytest.raises(psycopg.OperationalError):  # ... and is gone
        psycopg.connect(stack.database_url, connect_timeout=2).close()
