"""What a cold function does before its first answer, as deployed (K_SERVICE set, JSON logs): each door
imports only what that answer needs and builds only the models it reads (PERFORMANCE.md, cold start).
Speed itself belongs to the benchmark (`bench --only cold`); these tests keep the cuts from coming back.

Each case starts a fresh interpreter, loads main.py as functions-framework does, and sends the first
request: a Cloud Tasks task for a job that is already done (the claim finds nothing), or a webhook
that enqueues its task, against the local gateway and Cloud Tasks emulator. No FFMPEG_BINARY, as
deployed: the task finds the imageio-ffmpeg wheel's binary."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.emulators.cloud_tasks import CloudTasksEmulator
from devstack.emulators.gateway import Gateway
from sona.models import webhook_payload
from tests.support import SECRETS, insert_job, sql

REPO = Path(__file__).resolve().parents[1]
QUEUE = "projects/sona-cold/locations/local/queues/cold-start"

# Never on either door's first answer: the scheduler's door and the reclaim, the job's pipeline, the
# engines, the audio work and Storage (all on the first real job at the earliest), the job's row
# (a task's claim that finds nothing reads none), the clients and libraries that do those, the retry
# library (a claim's first try goes without it), and what the settings, the RPC and the logs were
# rewritten to avoid.
NEVER = (
    "sona.doors.scheduler",
    "sona.reclaim",
    "sona.job",
    "sona.rows",
    "sona.engines",
    "sona.audio.master",
    "sona.store.storage",
    "sona.ops",
    "pydub",
    "requests",
    "urllib3",
    "tenacity",
    "httpx",
    "storage3",
    "postgrest",
    "supabase",
    "psycopg",
    "google.auth",  # functions-framework itself brings google.cloud.functions, nothing more of google
    "google.api_core",
    "google.cloud.logging",
    "google.cloud.tasks_v2",
    "google.protobuf",
    "grpc",
    "pydantic_settings",
    "dotenv",
)
# The webhook's door only enqueues (over the standard library): no jobs store.
NEVER_ON_THE_WEBHOOK = ("sona.store",)

# The models each first answer builds: the settings and the one request body it reads; every other
# model is built on its first use (defer_build).
BUILT = {
    "task": ["sona.config.Settings", "sona.models.TaskPayload"],
    "webhook": ["sona.config.Settings", "sona.models.WebhookPayload"],
}

PROBE = """
import json, sys
import functions_framework
from pydantic import BaseModel

request = json.loads(sys.argv[1])
app = functions_framework.create_app(target=request["target"], source="main.py")
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
answer = app.test_client().post("/", json=request["payload"], headers=request["headers"])
models = {
    f"{name}.{value.__qualname__}": value
    for name, module in list(sys.modules.items()) if name.startswith("sona")
    for value in vars(module).values()
    if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == name
}
print(json.dumps({
    "status": answer.status_code,
    "body": answer.get_json(),
    "modules": sorted(sys.modules),
    "built": sorted(name for name, model in models.items() if model.__pydantic_complete__),
    "opened": sorted(set(opened)),
}))
"""


@pytest.fixture
def tasks() -> Iterator[CloudTasksEmulator]:
    emulator = CloudTasksEmulator()
    emulator.start()
    parent = QUEUE.rsplit("/queues/", 1)[0]
    requests.post(f"{emulator.url}/v2/{parent}/queues", json={"name": QUEUE}, timeout=10).raise_for_status()
    requests.post(f"{emulator.url}/v2/{QUEUE}:pause", json={}, timeout=10).raise_for_status()
    yield emulator
    emulator.stop()


def first_answer(
    target: str, payload: dict[str, Any], headers: dict[str, str], gateway: Gateway, tasks: CloudTasksEmulator
) -> dict[str, Any]:
    env = {
        "PATH": "/usr/bin:/bin",
        "K_SERVICE": "process-job",
        "K_REVISION": "process-job-00001-abc",
        "LOG_FORMAT": "json",
        "GOOGLE_CLOUD_PROJECT": "sona-cold",
        "SUPABASE_URL": gateway.url,
        "SUPABASE_SERVICE_ROLE_KEY": gateway.service_role_key,
        "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
        "WEBHOOK_SECRET": SECRETS["webhook_secret"],
        "CLOUD_TASKS_API_URL": tasks.url,
        "CLOUD_TASKS_QUEUE": QUEUE,
        "RUN_JOB_URL": "http://127.0.0.1:9/run_job",
        "TASKS_SERVICE_ACCOUNT": "tasks@sona-cold.iam.gserviceaccount.com",
    }
    request = json.dumps({"target": target, "payload": payload, "headers": headers})
    result = subprocess.run(
        [sys.executable, "-c", PROBE, request], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def done_job(db_url: str) -> str:
    job_id = insert_job(db_url)
    sql(db_url, "update jobs set status = 'completed' where id = %s", job_id, role=None)
    return str(job_id)


def imported(modules: list[str], names: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that are one of `names` or inside one of them."""
    return [m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names)]


@pytest.fixture
def task_answer(db_url: str, gateway: Gateway, tasks: CloudTasksEmulator) -> dict[str, Any]:
    return first_answer("run_job", {"job_id": done_job(db_url)}, {}, gateway, tasks)


@pytest.fixture
def webhook_answer(db_url: str, gateway: Gateway, tasks: CloudTasksEmulator) -> dict[str, Any]:
    headers = {"X-Webhook-Secret": SECRETS["webhook_secret"]}
    return first_answer("process_job", webhook_payload(done_job(db_url)), headers, gateway, tasks)


def test_a_tasks_first_answer_claims_without_the_job_paths_imports(task_answer: dict[str, Any]) -> None:
    assert (task_answer["status"], task_answer["body"]["outcome"]) == (200, "skipped")
    assert imported(task_answer["modules"], NEVER) == []


def test_a_webhooks_first_answer_enqueues_without_the_store_or_the_job_paths_imports(
    webhook_answer: dict[str, Any],
) -> None:
    assert (webhook_answer["status"], webhook_answer["body"]["outcome"]) == (202, "enqueued")
    assert imported(webhook_answer["modules"], NEVER + NEVER_ON_THE_WEBHOOK) == []


@pytest.mark.parametrize("door", ["task", "webhook"])
def test_a_first_answer_builds_only_the_models_it_reads(
    door: str, request: pytest.FixtureRequest
) -> None:
    answer = request.getfixturevalue(f"{door}_answer")
    assert answer["built"] == BUILT[door]


@pytest.mark.parametrize("door", ["task", "webhook"])
def test_a_first_answer_reads_no_packages_entry_points(door: str, request: pytest.FixtureRequest) -> None:
    """pydantic's search for plugins reads every installed package's entry points when it builds its
    first model; main.py tells it there are none (PYDANTIC_DISABLE_PLUGINS)."""
    answer = request.getfixturevalue(f"{door}_answer")
    assert [path for path in answer["opened"] if path.endswith("entry_points.txt")] == []
