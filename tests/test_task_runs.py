"""cloud_tasks mode in process (functions-framework's test clients) against the local Cloud Tasks:
the webhook's call to the public door process_job creates one task and answers 202; the task names
the private worker run_job and carries an OIDC token for it; the task's call to run_job runs the job
(Cloud Run has checked the token before: tests/test_cloud_tasks_dispatch.py shows that front); a
released job's retry is a task scheduled for its backoff."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from functions_framework import create_app

from devstack.doubles.stable_audio_double import Behaviour, StableAudioDouble
from devstack.emulators.cloud_tasks import CloudTasksEmulator
from devstack.emulators.gateway import Gateway
from sona.services import reset_services
from sona.store.storage import AudioStorage
from sona.task_queue import QueueLimits
from tests.support import SECRETS, insert_job, job_row

MAIN = str(Path(__file__).resolve().parents[1] / "main.py")
QUEUE = "projects/sona-test/locations/local/queues/sona-jobs"
WORKER_URL = "http://127.0.0.1:9/run_job"
TASKS_ACCOUNT = "sona-tasks@sona-test.iam.gserviceaccount.com"


@pytest.fixture
def tasks() -> Iterator[CloudTasksEmulator]:
    emulator = CloudTasksEmulator()
    emulator.start()
    limits = QueueLimits(
        max_dispatches_per_second=5, max_concurrent_dispatches=2, lease_s=60, max_attempts_per_job=3
    )
    requests.post(
        f"{emulator.url}/v2/{QUEUE.rsplit('/queues/', 1)[0]}/queues", json=limits.as_queue(QUEUE), timeout=10
    ).raise_for_status()
    # Hold dispatch: these tests read the tasks and deliver them through the test client.
    requests.post(f"{emulator.url}/v2/{QUEUE}:pause", json={}, timeout=10).raise_for_status()
    yield emulator
    emulator.stop()


@pytest.fixture
def client(
    gateway: Gateway, double: StableAudioDouble, tasks: CloudTasksEmulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FlaskClient]:
    env = {
        "SUPABASE_URL": gateway.url,
        "SUPABASE_SERVICE_ROLE_KEY": gateway.service_role_key,
        "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
        "STABLE_AUDIO_API_URL": double.url,
        "WEBHOOK_SECRET": SECRETS["webhook_secret"],
        "RETRY_DELAY_MS": "50",
        "DISPATCH": "cloud_tasks",
        "CLOUD_TASKS_API_URL": tasks.url,
        "CLOUD_TASKS_QUEUE": QUEUE,
        "RUN_JOB_URL": WORKER_URL,
        "TASKS_SERVICE_ACCOUNT": TASKS_ACCOUNT,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_services()
    AudioStorage._public.clear()
    yield create_app(target="process_job", source=MAIN).test_client()
    reset_services()


@pytest.fixture
def worker(client: FlaskClient) -> FlaskClient:
    """run_job, in the same environment as the door (one instance's services)."""
    return create_app(target="run_job", source=MAIN).test_client()


def webhook(client: FlaskClient, job_id: uuid.UUID) -> Any:
    body = {"type": "INSERT", "table": "jobs", "schema": "public", "record": {"id": str(job_id)}}
    return client.post("/", json=body, headers={"X-Webhook-Secret": SECRETS["webhook_secret"]})


def queued_tasks(tasks: CloudTasksEmulator) -> list[dict[str, Any]]:
    listed = requests.get(f"{tasks.url}/v2/{QUEUE}/tasks?responseView=FULL", timeout=10).json()
    return list(listed.get("tasks", []))


def deliver(client: FlaskClient, task: dict[str, Any]) -> Any:
    """What Cloud Tasks sends: the task's body and headers."""
    request = task["httpRequest"]
    return client.post("/", data=base64.b64decode(request["body"]), headers=request["headers"])


def test_the_webhook_creates_one_named_task_and_answers_202(
    client: FlaskClient, db_url: str, tasks: CloudTasksEmulator, double: StableAudioDouble
) -> None:
    job_id = insert_job(db_url, duration=1)
    answers = [webhook(client, job_id) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert [a.get_json()["outcome"] for a in answers] == ["enqueued", "already_enqueued", "already_enqueued"]
    (task,) = queued_tasks(tasks)
    assert task["name"].endswith(f"{job_id}-a0-r0")
    assert task["httpRequest"]["url"] == WORKER_URL
    assert task["httpRequest"]["oidcToken"] == {"serviceAccountEmail": TASKS_ACCOUNT, "audience": WORKER_URL}
    assert json.loads(base64.b64decode(task["httpRequest"]["body"])) == {"job_id": str(job_id)}
    assert task["dispatchDeadline"] == "340s"  # the function timeout, Cloud Run's hold, a cold start
    assert (job_row(db_url, job_id)["status"], double.call_count) == ("pending", 0)  # nothing ran yet


def test_the_tasks_call_runs_the_job(
    client: FlaskClient,
    worker: FlaskClient,
    db_url: str,
    tasks: CloudTasksEmulator,
    double: StableAudioDouble,
) -> None:
    job_id = insert_job(db_url, duration=1)
    webhook(client, job_id)
    (task,) = queued_tasks(tasks)
    answer = deliver(worker, task)
    assert (answer.status_code, answer.get_json()["outcome"]) == (200, "completed")
    assert job_row(db_url, job_id)["status"] == "completed"
    assert double.paid_generations == 1


def test_the_door_does_not_run_jobs_for_a_task_shaped_call(
    client: FlaskClient, db_url: str, double: StableAudioDouble
) -> None:
    job_id = insert_job(db_url, duration=1)
    answer = client.post("/", json={"job_id": str(job_id)})
    assert (answer.status_code, answer.get_json()["error"]) == (401, "unauthorized")
    assert (job_row(db_url, job_id)["status"], double.call_count) == ("pending", 0)


def test_a_duplicate_task_delivery_runs_the_job_once(
    client: FlaskClient,
    worker: FlaskClient,
    db_url: str,
    tasks: CloudTasksEmulator,
    double: StableAudioDouble,
) -> None:
    job_id = insert_job(db_url, duration=1)
    webhook(client, job_id)
    (task,) = queued_tasks(tasks)
    outcomes = [deliver(worker, task).get_json()["outcome"] for _ in range(2)]
    assert outcomes == ["completed", "skipped"]
    assert double.paid_generations == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [({"job_id": "not-a-uuid"}, 422), ({"job": 1}, 422), ([], 422)],
    ids=["bad id", "wrong field", "not an object"],
)
def test_a_malformed_task_body_is_refused(worker: FlaskClient, body: Any, status: int) -> None:
    answer = worker.post("/", json=body)
    assert answer.status_code == status
    assert answer.get_json()["error"] == "invalid_task"


def test_a_released_job_gets_a_task_scheduled_for_its_backoff(
    client: FlaskClient,
    worker: FlaskClient,
    db_url: str,
    tasks: CloudTasksEmulator,
    double: StableAudioDouble,
) -> None:
    double.script(*[Behaviour("error", 503)] * 4)  # the call and its three retries
    job_id = insert_job(db_url, duration=1)
    webhook(client, job_id)
    (first,) = queued_tasks(tasks)
    assert deliver(worker, first).get_json()["outcome"] == "retrying"
    row = job_row(db_url, job_id)
    retry = next(t for t in queued_tasks(tasks) if t["name"].endswith(f"{job_id}-a1-r0"))
    scheduled = retry["scheduleTime"].replace("Z", "+00:00")
    assert abs(_epoch(scheduled) - row["run_after"].timestamp()) < 1


def test_an_unreachable_queue_is_a_503_and_nothing_changes(
    client: FlaskClient, db_url: str, tasks: CloudTasksEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_TASKS_API_URL", "http://127.0.0.1:9")
    reset_services()
    job_id = insert_job(db_url, duration=1)
    answer = webhook(client, job_id)
    assert (answer.status_code, answer.get_json()["error"]) == (503, "queue_unavailable")
    assert job_row(db_url, job_id)["status"] == "pending"


def test_a_missing_queue_is_a_500_that_blames_the_configuration(
    client: FlaskClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_TASKS_QUEUE", "projects/sona-test/locations/local/queues/nope")
    reset_services()
    answer = webhook(client, insert_job(db_url, duration=1))
    assert (answer.status_code, answer.get_json()["error"]) == (500, "queue_misconfigured")


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
