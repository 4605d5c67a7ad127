"""`python -m sona stats` against the gateway and a known mix of jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devstack.emulators.gateway import Gateway
from sona.ops.stats import render_table
from tests.support import SECRETS, insert_job, sql

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def known_mix(db_url: str) -> str:
    for seconds in (2, 4, 6):
        job = insert_job(db_url, status="completed")
        sql(
            db_url,
            "update jobs set started_at = now() - make_interval(secs => %s + 1),"
            " completed_at = now() - interval '1 second' where id = %s",
            seconds,
            job,
            role=None,
        )
    failed = insert_job(db_url, status="failed", error_message="Prompts must be in English", attempts=1)
    sql(db_url, "update jobs set completed_at = now() where id = %s", failed, role=None)
    insert_job(db_url)  # pending, just created
    old_pending = insert_job(db_url)
    sql(
        db_url,
        "update jobs set created_at = now() - interval '30 minutes' where id = %s",
        old_pending,
        role=None,
    )
    stuck = insert_job(db_url, status="processing", attempts=1)
    sql(
        db_url,
        "update jobs set lease_expires_at = now() - interval '1 minute' where id = %s",
        stuck,
        role=None,
    )
    outside = insert_job(db_url, status="completed")
    sql(db_url, "update jobs set created_at = now() - interval '2 days' where id = %s", outside, role=None)
    return str(failed)


def run_stats(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "SUPABASE_URL": gateway.url,
        "SUPABASE_SERVICE_ROLE_KEY": gateway.service_role_key,
        "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
        "WEBHOOK_SECRET": SECRETS["webhook_secret"],
        "DISPATCH": "direct",
    }
    return subprocess.run(
        [sys.executable, "-m", "sona", "stats", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_stats_json_has_the_right_figures(gateway: Gateway, known_mix: str) -> None:
    result = run_stats(gateway, "--json")
    assert result.returncode == 0, result.stderr
    figures: dict[str, Any] = json.loads(result.stdout)
    assert figures["total"] == 7
    assert figures["by_status"] == {"completed": 3, "failed": 1, "pending": 2, "processing": 1}
    assert figures["failure_rate"] == 0.25
    assert figures["avg_processing_s"] == pytest.approx(4.0, abs=0.01)
    assert figures["p95_processing_s"] == pytest.approx(5.8, abs=0.01)
    assert figures["stuck"] == {"expired_leases": 1, "pending_over_10_min": 1}
    assert [(f["id"], f["error"]) for f in figures["recent_failures"]] == [
        (known_mix, "Prompts must be in English")
    ]


def test_stats_answers_from_the_rows_when_the_hours_cannot_be_folded(
    gateway: Gateway, known_mix: str
) -> None:
    gateway.faults.add("rpc:sona_fold_job_stats", 500, {"code": "57014", "message": "statement timeout"})
    result = run_stats(gateway, "--json")
    assert result.returncode == 0, result.stderr
    assert "Settled hours not folded" in result.stderr
    assert json.loads(result.stdout)["total"] == 7


def test_stats_table_is_readable(gateway: Gateway, known_mix: str) -> None:
    result = run_stats(gateway, "--hours", "24")
    assert result.returncode == 0, result.stderr
    assert "Jobs created in the last 24 h: 7" in result.stdout
    assert "failure rate        25.0 %" in result.stdout
    assert "Prompts must be in English" in result.stdout


def test_stats_show_the_pause_quota_refusals_and_cancellations(gateway: Gateway, db_url: str) -> None:
    paused = insert_job(db_url, status="processing", lease_token="00000000-0000-0000-0000-0000000000aa")
    sql(
        db_url,
        "select * from pause_service(%s, '00000000-0000-0000-0000-0000000000aa', 'provider_out_of_credits',"
        " 'HTTP 402 payment_required', 'The audio service is unavailable right now.', 300)",
        paused,
    )
    sql(db_url, "select * from cancel_job(%s)", insert_job(db_url))  # an operator, as the service role
    result = run_stats(gateway, "--json")
    spend = json.loads(result.stdout)["spend"]
    assert (spend["pause"]["code"], spend["pause"]["jobs_released"]) == ("provider_out_of_credits", 1)
    assert spend["cancelled"] == 1
    assert set(spend["quota"]) >= {"refused_active_total", "refused_daily_total", "max_active_jobs"}
    table = run_stats(gateway).stdout
    assert "PAUSED since" in table and "provider_out_of_credits: HTTP 402 payment_required" in table
    assert "quota refusals" in table


def test_the_table_shows_every_operator_figure() -> None:
    figures: dict[str, Any] = {
        "window_hours": 1,
        "total": 2,
        "by_status": {"completed": 1, "failed": 1},
        "failure_rate": 0.5,
        "throughput": {
            "completed": 1,
            "per_minute": 0.0167,
            "busiest_minute": {"minute": "12:00", "completed": 1},
        },
        "attempts": {"ended": 3, "failed_by_class": {"storage": {"count": 1, "rate": 0.3333}}},
        "queue_wait_s": {"p50": 0.2, "p95": 0.9},
        "processing_s": {"p50": 3.1, "p95": 4.2},
        "provider": {"calls": 3, "p50_s": 2.5, "p95_s": 3.5, "errors": 1, "error_rate": 0.3333},
        "storage": {"stored": 1, "failed": 1, "success_rate": 0.5, "upload_p95_s": 0.12},
        "retries": {"per_job": 0.5, "max": 1, "jobs_retried": 1},
    }
    text = render_table(figures)
    for line in (
        "completed           1 (0.0167 per minute)",
        "busiest minute      1 jobs at 12:00",
        "queue wait p50/p95  0.2 s / 0.9 s",
        "processing p50/p95  3.1 s / 4.2 s",
        "provider p50/p95    2.5 s / 3.5 s over 3 calls, errors 33.33 %",
        "storage success     50.0 %, upload p95 0.12 s",
        "retries per job     0.5 (max 1, 1 jobs retried)",
        "storage                 1  33.33 %",
    ):
        assert line in text


def test_stats_price_each_models_paid_generations_from_the_credit_setting(
    gateway: Gateway, db_url: str
) -> None:
    for model, lost in (("stable-audio-2.5", 0), ("stable-audio-3", 0), ("stable-audio-3", 1)):
        job = insert_job(db_url, status="completed")
        sql(
            db_url,
            "update jobs set audio = jsonb_build_object('model', %s::text), generations_lost = %s"
            " where id = %s",
            model,
            lost,
            job,
            role=None,
        )
    figures = json.loads(run_stats(gateway, "--json").stdout)["credits"]
    assert {m: (f["paid"], f["credits"]) for m, f in figures["models"].items()} == {
        "stable-audio-2.5": (1, 20),
        "stable-audio-3": (3, 78),  # two completed, one more paid after its id expired; 26 each
    }
    assert figures["total_credits"] == 98


def test_the_stable_audio_3_price_is_a_setting() -> None:
    from sona.ops.stats import credits_spent

    spent = credits_spent({"stable-audio-3": {"completed": 4, "lost": 0}}, {"stable-audio-3": 8})
    assert (spent["models"]["stable-audio-3"]["credits"], spent["total_credits"]) == (32, 32)
    assert "stable-audio-3" in render_table(
        {"window_hours": 1, "total": 0, "by_status": {}, "credits": spent}
    )
