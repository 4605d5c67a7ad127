"""`python -m sona dev --json`: the local stack for other tools, described in one JSON line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from sona.local.stack import free_port
from sona.models import webhook_payload

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_dev_prints_one_json_line_that_drives_the_stack_and_stops_on_sigint() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sona", "dev", "--json", "--process-job-port", str(port)],
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
        skipped = requests.post(
            info["process_job_url"],
            headers={"X-Webhook-Secret": info["webhook_secret"]},
            json=webhook_payload("00000000-0000-0000-0000-000000000000"),
            timeout=10,
        )
        assert skipped.json()["outcome"] == "skipped"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
