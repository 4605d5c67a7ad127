"""reclaim_jobs through real processes: crashes, stale workers, lost webhooks, exhaustion,
concurrent reclaims and a backlog. Lease expiry is simulated by backdating it in SQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from devstack.doubles.stable_audio_double import Behaviour, StableAudioDouble
from devstack.stack import LocalStack
from sona.errors import StaleLease
from sona.rows import ClaimedJob, Output
from sona.store.jobs import JobsStore
from tests.support import AUDIO_INFO, RELAY_PAUSE_S, sql, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SLOW = 30.0  # a provider still generating when the process is killed
BATCH = 8  # RECLAIM_BATCH_SIZE: twice RECLAIM_CONCURRENCY
BACKLOG = 4 * BATCH  # drains in exactly four reclaims


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    env = {
        "DISPATCH": "direct",  # reclaim's direct dispatch; Cloud Tasks: tests/test_cloud_tasks_dispatch.py
        "RETRY_DELAY_MS": "50",
        # Small batches, so a backlog of a few dozen jobs already takes several reclaims, each
        # holding more jobs than its concurrency lets run at once.
        "RECLAIM_BATCH_SIZE": str(BATCH),
        "RECLAIM_CONCURRENCY": "4",
        "RECLAIM_GRACE_S": "60",
        "MAX_ATTEMPTS": "3",
    }
    with LocalStack(
        tmp_path_factory.mktemp("reclaim"),
        env=env,
        process_env={"PATH": "/usr/bin:/bin"},
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
    ) as s:
        yield s


@pytest.fixture
def double(stack: LocalStack) -> StableAudioDouble:
    assert stack.double is not None and stack.relay is not None
    stack.double.reset()
    stack.relay.wait_idle()  # an earlier test's dropped deliveries are dropped by now
    stack.relay.enabled = True
    sql(stack.database_url, "delete from jobs", role=None)
    return stack.double


def reclaim(stack: LocalStack) -> dict[str, Any]:
    response = requests.post(
        stack.reclaim_jobs_url, headers={"X-Webhook-Secret": stack.webhook_secret}, timeout=120
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def expire_lease(stack: LocalStack, job_id: uuid.UUID) -> None:
    sql(
        stack.database_url,
        "update jobs set lease_expires_at = now() - interval '5 seconds' where id = %s",
        job_id,
        role=None,
    )


def crash_process_job(stack: LocalStack) -> None:
    """SIGKILL the whole functions-framework process group, then start a fresh instance."""
    function = stack.functions["process_job"]
    function.kill(signal.SIGKILL)
    stack.start_function("process_job", function.port)


def attempts(stack: LocalStack, job_id: uuid.UUID) -> list[tuple[int, str | None]]:
    rows = sql(
        stack.database_url,
        "select attempt, outcome from job_attempts where job_id = %s order by attempt",
        job_id,
        role=None,
    )
    return [(r["attempt"], r["outcome"]) for r in rows]


def stored_files(stack: LocalStack, job_id: uuid.UUID) -> list[str]:
    folder = stack.root / "storage" / "audio-files" / "generated"
    return sorted(p.name for p in folder.glob(f"{job_id}_*"))


def test_a_job_whose_process_was_killed_completes_after_one_reclaim(
    stack: LocalStack, double: StableAudioDouble
) -> None:
    double.script(Behaviour("ok", delay_s=SLOW))
    job_id = stack.insert_job("killed mid-generation", duration=1)
    wait_until(lambda: double.call_count == 1)
    killed_token = stack.job(job_id)["lease_token"]
    crash_process_job(stack)
    expire_lease(stack, job_id)

    summary = reclaim(stack)

    assert (summary["reclaimed"], summary["dispatched"], summary["completed"]) == (1, 1, 1), (
        summary,
        stack.functions["reclaim_jobs"].output()[-3000:],
    )
    row = stack.job(job_id)
    assert (row["status"], row["attempts"]) == ("completed", 2)
    assert attempts(stack, job_id) == [(1, "lease_expired"), (2, "completed")]
    assert stored_files(stack, job_id) == sorted(
        urlsplit(row[url]).path.rsplit("/", 1)[1] for url in ("wav_url", "mp3_url", "peaks_url")
    )
    killed = ClaimedJob.model_validate({**row, "lease_token": killed_token, "attempts": 1})
    with pytest.raises(StaleLease):
        JobsStore(stack.settings()).complete(killed, Output("x", "y", AUDIO_INFO))
    assert stack.job(job_id)["wav_url"] == row["wav_url"]


def test_a_stale_worker_finishing_late_does_not_overwrite_the_newer_result(
    stack: LocalStack, double: StableAudioDouble
) -> None:
    double.script(Behaviour("ok", delay_s=3.0))  # the first attempt outlives its lease
    job_id = stack.insert_job("slower than the lease", duration=1)
    wait_until(lambda: double.call_count == 1)
    expire_lease(stack, job_id)

    summary = reclaim(stack)  # re-runs the job while the first attempt is still waiting
    newer = stack.job(job_id)
    assert (summary["completed"], newer["status"], newer["attempts"]) == (1, "completed", 2)

    # each attempt stores its WAV, peaks and MP3 (a stale one too: its audio is paid for)
    wait_until(lambda: double.paid_generations == 2 and len(stored_files(stack, job_id)) == 6)
    wait_until(lambda: not stack.relay or stack.relay.inflight() == 0)
    assert stack.job(job_id) == newer
    assert attempts(stack, job_id) == [(1, "lease_expired"), (2, "completed")]
    assert "Dropped the complete" in stack.functions["process_job"].output()


def test_a_lost_webhook_is_dispatched_after_the_grace_period_and_not_before(
    stack: LocalStack, double: StableAudioDouble
) -> None:
    assert stack.relay is not None
    stack.relay.enabled = False  # pg_net lost the delivery
    job_id = stack.insert_job("never delivered", duration=1)

    early = reclaim(stack)
    assert (early["dispatched"], stack.job(job_id)["status"]) == (0, "pending")

    sql(
        stack.database_url,
        "update jobs set created_at = now() - interval '61 seconds' where id = %s",
        job_id,
        role=None,
    )
    late = reclaim(stack)
    assert (late["dispatched"], late["completed"]) == (1, 1)
    assert stack.job(job_id)["status"] == "completed"
    assert double.call_count == 1


def test_a_job_that_crashes_every_time_fails_after_max_attempts_and_is_never_dispatched_again(
    stack: LocalStack, double: StableAudioDouble
) -> None:
    # After the last paid attempt, one finishing attempt looks for stored files; there are none.
    double.script(*[Behaviour("ok", delay_s=SLOW)] * 3)
    job_id = stack.insert_job("crashes every time", duration=1)
    wait_until(lambda: double.call_count == 1)
    crash_process_job(stack)
    for attempt in (2, 3):
        expire_lease(stack, job_id)
        dispatcher = threading.Thread(target=reclaim, args=(stack,))
        dispatcher.start()  # holds the dispatch open until the crash cuts it off
        wait_until(lambda attempt=attempt: double.call_count == attempt)  # type: ignore[misc]
        crash_process_job(stack)
        dispatcher.join()
    expire_lease(stack, job_id)
    summary = reclaim(stack)
    assert (summary["reclaimed"], summary["dispatched"], summary["job_failed"]) == (1, 1, 1)
    row = stack.job(job_id)
    assert (row["status"], row["attempts"], row["reuse_only"]) == ("failed", 4, True)
    assert row["error_message"] == "The job timed out after 3 attempts."
    assert [o for _, o in attempts(stack, job_id)] == ["lease_expired"] * 3 + ["failed"]
    sql(
        stack.database_url,
        "update jobs set created_at = now() - interval '1 day' where id = %s",
        job_id,
        role=None,
    )
    again = reclaim(stack)
    assert again["dispatched"] == 0
    assert double.call_count == 3


def test_two_reclaims_at_the_same_moment_dispatch_each_job_once(
    stack: LocalStack, double: StableAudioDouble
) -> None:
    assert stack.relay is not None
    stack.relay.enabled = False
    jobs = [stack.insert_job(f"concurrent reclaim {i}", duration=1) for i in range(6)]
    sql(stack.database_url, "update jobs set created_at = now() - interval '2 minutes'", role=None)
    barrier = threading.Barrier(2)
    summaries: list[dict[str, Any]] = []

    def run() -> None:
        barrier.wait()
        summaries.append(reclaim(stack))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(s["dispatched"] for s in summaries) == 6
    assert double.call_count == 6
    assert {stack.job(j)["status"] for j in jobs} == {"completed"}


def test_a_backlog_drains_across_reclaims_with_bounded_concurrency(
    stack: LocalStack, double: StableAudioDouble
) -> None:
    """Four batches' worth of lost webhooks: each reclaim dispatches one batch (no more, though
    more are due), never more than RECLAIM_CONCURRENCY at once, and every job is generated once."""
    assert stack.relay is not None
    stack.relay.enabled = False
    user = stack.create_user()
    sql(
        stack.database_url,
        "insert into jobs (user_id, prompt, duration, created_at)"
        " select %s, 'backlog ' || i, 1, now() - interval '10 minutes' from generate_series(1, %s) i",
        user,
        BACKLOG,
        role=None,
    )

    calls = []
    while len(calls) < 10:
        summary = reclaim(stack)
        if summary["due"] == 0:
            break
        calls.append(summary)

    assert [c["dispatched"] for c in calls] == [BATCH] * 4
    assert sum(c["completed"] for c in calls) == BACKLOG
    counts = sql(stack.database_url, "select status, count(*) as n from jobs group by status", role=None)
    assert counts == [{"status": "completed", "n": BACKLOG}]
    assert double.call_count == BACKLOG
    prompts = sorted(c.fields["prompt"] for c in double.calls)
    assert prompts == sorted(f"backlog {i}" for i in range(1, BACKLOG + 1))  # each generated exactly once
    assert double.max_concurrency <= 4


def test_the_reclaim_command_runs_once_from_a_terminal(stack: LocalStack, double: StableAudioDouble) -> None:
    assert stack.relay is not None
    stack.relay.enabled = False
    job_id = stack.insert_job("from the terminal", duration=1)
    sql(stack.database_url, "update jobs set created_at = now() - interval '2 minutes'", role=None)
    result = subprocess.run(
        [sys.executable, "-m", "sona", "reclaim"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**stack.function_env(), "LOG_LEVEL": "warning"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["completed"] == 1
    assert stack.job(job_id)["status"] == "completed"
