"""Dispatch through Cloud Tasks: task names, the settings it needs, and the deploy plan that creates
the queue with its limits, the private worker and the identity its tasks carry."""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from functions_framework import create_app

from devstack.emulators.cloud_tasks import CloudTasksEmulator
from sona.config import ConfigError
from sona.ops.deploy import make_plan
from sona.ops.webhook_sql import WebhookConfig
from sona.services import reset_services
from sona.task_queue import QueueLimits, task_id
from tests.support import SECRETS, make_settings
from tests.test_deploy import deploy_settings, deploys, dry_run, env_vars, flag

QUEUE = "projects/p/locations/us-central1/queues/sona-jobs"


def tasks_settings(**overrides: object) -> object:
    values: dict[str, object] = {
        "dispatch": "cloud_tasks",
        "cloud_tasks_queue": QUEUE,
        "run_job_url": "https://us-central1-p.cloudfunctions.net/run-job",
        "tasks_service_account": "sona-tasks@p.iam.gserviceaccount.com",
        **overrides,
    }
    return make_settings(**values)


# -- task names -------------------------------------------------------------------------


def test_a_task_id_is_valid_for_cloud_tasks_and_names_the_job() -> None:
    job = uuid.uuid4()
    name = task_id(job, 2, 5)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,500}", name)
    assert str(job) in name and name.endswith("-a2-r5")


@pytest.mark.parametrize(
    ("a", "b"),
    [((0, 0), (0, 0)), ((0, 0), (1, 0)), ((1, 0), (1, 1))],
    ids=["same delivery", "next attempt", "next round"],
)
def test_a_task_id_is_the_same_only_for_the_same_attempt_and_round(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    job = uuid.uuid4()
    assert (task_id(job, *a) == task_id(job, *b)) == (a == b)


# -- settings --------------------------------------------------------------------------------------


def test_cloud_tasks_is_the_default_and_names_everything_it_needs_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(dispatch="cloud_tasks")
    text = str(caught.value)
    assert "CLOUD_TASKS_QUEUE" in text and "RUN_JOB_URL" in text and "TASKS_SERVICE_ACCOUNT" in text
    assert "DISPATCH=direct" in text


def test_a_job_longer_than_a_dispatch_deadline_is_refused_with_cloud_tasks_only() -> None:
    with pytest.raises(ConfigError, match="15 to 1800 s"):
        tasks_settings(job_timeout_ms=1_800_000)
    assert make_settings(job_timeout_ms=1_800_000).dispatch == "direct"


def test_the_queue_must_be_a_full_queue_name() -> None:
    with pytest.raises(ConfigError, match="CLOUD_TASKS_QUEUE"):
        tasks_settings(cloud_tasks_queue="sona-jobs")


@pytest.mark.parametrize(
    ("dispatch", "timeout_ms"), [("cloud_tasks", 10_000), ("direct", 310_000)], ids=["enqueue", "whole job"]
)
def test_the_webhook_waits_only_as_long_as_its_call_takes(dispatch: str, timeout_ms: int) -> None:
    config = WebhookConfig(job_timeout_ms=300_000, dispatch=dispatch)
    assert config.timeout_ms == timeout_ms


# -- the deploy plan -------------------------------------------------------------------------------


def test_the_deploy_creates_or_updates_the_queue_with_its_limits() -> None:
    script = dry_run(deploy_settings({"MAX_INSTANCES": "10", "MAX_CONCURRENT_JOBS": "2"}))
    assert "gcloud tasks queues describe sona-jobs" in script
    for verb in ("update", "create"):
        line = next(li for li in script.splitlines() if f"gcloud tasks queues {verb} sona-jobs" in li)
        argv = shlex.split(line)
        assert flag(argv, "max-dispatches-per-second") == "5"  # a third of Stability's 15 per second
        assert flag(argv, "max-concurrent-dispatches") == "20"  # 10 instances x 2 jobs
        assert flag(argv, "max-backoff") == "340s"  # the lease: function timeout 310 s + 30 s
        assert flag(argv, "max-retry-duration") == "927s"  # the 13th attempt: both limits meet there
        assert flag(argv, "max-attempts") == "13"  # what the backoff fits in three leases (1020 s)
    # the queue exists before the function that enqueues into it
    assert script.index("gcloud tasks queues") < script.index("gcloud functions deploy")


def test_only_the_functions_account_may_enqueue() -> None:
    script = dry_run(deploy_settings())
    line = next(li for li in script.splitlines() if "add-iam-policy-binding sona-jobs" in li)
    argv = shlex.split(line)
    assert flag(argv, "role") == "roles/cloudtasks.enqueuer"
    assert flag(argv, "member") == "serviceAccount:sona-functions@sona-test-project.iam.gserviceaccount.com"


TASKS_ACCOUNT = "sona-tasks@sona-test-project.iam.gserviceaccount.com"
WORKER_URL = "https://us-central1-sona-test-project.cloudfunctions.net/run-job"


def test_the_worker_is_private_and_only_the_tasks_account_may_invoke_it() -> None:
    script = dry_run(deploy_settings())
    worker = deploys(script)["run-job"]
    assert flag(worker, "entry-point") == "run_job"
    assert "--no-allow-unauthenticated" in worker
    invokers = [shlex.split(li) for li in script.splitlines() if "add-invoker-policy-binding run-job" in li]
    assert [flag(argv, "member") for argv in invokers] == [f"serviceAccount:{TASKS_ACCOUNT}"]
    assert not [
        li for li in script.splitlines() if "run-job" in li and ("allUsers" in li or "invoker-iam" in li)
    ]


def test_the_enqueuer_may_act_as_the_tasks_account_and_nothing_more() -> None:
    script = dry_run(deploy_settings())
    (line,) = [li for li in script.splitlines() if "roles/iam.serviceAccountUser" in li]
    argv = shlex.split(line)
    assert argv[:5] == ["gcloud", "iam", "service-accounts", "add-iam-policy-binding", TASKS_ACCOUNT]
    assert flag(argv, "member") == "serviceAccount:sona-functions@sona-test-project.iam.gserviceaccount.com"


def test_every_function_knows_the_queue_the_worker_and_the_tasks_identity() -> None:
    functions = deploys(dry_run(deploy_settings()))
    assert set(functions) == {"process-job", "run-job", "reclaim-jobs"}
    for argv in functions.values():
        env = env_vars(argv)
        assert env["DISPATCH"] == "cloud_tasks"
        assert env["CLOUD_TASKS_QUEUE"] == "projects/sona-test-project/locations/us-central1/queues/sona-jobs"
        assert (env["RUN_JOB_URL"], env["TASKS_SERVICE_ACCOUNT"]) == (WORKER_URL, TASKS_ACCOUNT)
        assert "TASK_SECRET" not in (flag(argv, "set-secrets") or "")


def test_the_worker_exists_before_the_door_that_sends_it_work() -> None:
    script = dry_run(deploy_settings())
    assert script.index("gcloud functions deploy run-job") < script.index(
        "gcloud functions deploy process-job"
    )


@pytest.mark.parametrize(("dispatch", "refused"), [("cloud_tasks", True), ("direct", False)])
def test_the_deploy_refuses_a_job_longer_than_a_dispatch_deadline_with_cloud_tasks(
    dispatch: str, refused: bool
) -> None:
    settings = deploy_settings({"JOB_TIMEOUT_MS": "1800000", "DISPATCH": dispatch})
    if refused:
        with pytest.raises(ConfigError, match="15 to 1800 s"):
            make_plan(settings)
    else:
        assert not make_plan(settings).cloud_tasks


def test_direct_dispatch_deploys_no_queue() -> None:
    script = dry_run(deploy_settings({"DISPATCH": "direct"}))
    assert "gcloud tasks" not in script
    assert set(deploys(script)) == {"process-job", "reclaim-jobs"}  # no worker: the webhook runs jobs
    assert env_vars(deploys(script)["process-job"])["DISPATCH"] == "direct"


# -- the door: only the webhook secret ------------------------------------------------------------

MAIN = str(Path(__file__).resolve().parents[1] / "main.py")
LOCAL_QUEUE = "projects/sona-test/locations/local/queues/sona-jobs"


@pytest.fixture
def queue() -> Iterator[CloudTasksEmulator]:
    emulator = CloudTasksEmulator()
    emulator.start()
    limits = QueueLimits(
        max_dispatches_per_second=5, max_concurrent_dispatches=2, lease_s=60, max_attempts_per_job=3
    )
    parent = LOCAL_QUEUE.rsplit("/queues/", 1)[0]
    requests.post(
        f"{emulator.url}/v2/{parent}/queues", json=limits.as_queue(LOCAL_QUEUE), timeout=10
    ).raise_for_status()
    requests.post(f"{emulator.url}/v2/{LOCAL_QUEUE}:pause", json={}, timeout=10).raise_for_status()
    yield emulator
    emulator.stop()


def door_env(queue: CloudTasksEmulator, **extra: str) -> dict[str, str]:
    """What the plan deploys the door with in cloud_tasks mode: no provider or database key."""
    return {
        "SUPABASE_URL": "https://abc.supabase.co",
        "WEBHOOK_SECRET": SECRETS["webhook_secret"],
        "CLOUD_TASKS_QUEUE": LOCAL_QUEUE,
        "CLOUD_TASKS_API_URL": queue.url,
        "RUN_JOB_URL": "http://127.0.0.1:9/run_job",
        "TASKS_SERVICE_ACCOUNT": "sona-tasks@sona-test.iam.gserviceaccount.com",
        "LOG_FORMAT": "text",
        **extra,
    }


def webhook(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout's
    for name in ("SUPABASE_SERVICE_ROLE_KEY", "STABLE_AUDIO_API_KEY", "REPLICATE_API_TOKEN", "FUNCTION_ROLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_services()
    try:
        client = create_app(target="process_job", source=MAIN).test_client()
        record = {"id": str(uuid.uuid4()), "status": "queued"}
        body = {"type": "INSERT", "table": "jobs", "schema": "public", "record": record, "old_record": None}
        return client.post("/", headers={"X-Webhook-Secret": SECRETS["webhook_secret"]}, json=body)
    finally:
        reset_services()


def test_the_door_enqueues_with_only_the_webhook_secret(
    queue: CloudTasksEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    answer = webhook(door_env(queue, FUNCTION_ROLE="door"), monkeypatch, tmp_path)
    assert (answer.status_code, answer.get_json()["outcome"]) == (202, "enqueued")


def test_without_the_door_role_a_function_refuses_to_start_without_its_keys(
    queue: CloudTasksEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    answer = webhook(door_env(queue), monkeypatch, tmp_path)
    assert (answer.status_code, answer.get_json()["error"]) == (500, "misconfigured")


def test_a_door_in_direct_mode_is_refused_since_it_runs_jobs() -> None:
    with pytest.raises(ConfigError, match="FUNCTION_ROLE=door needs DISPATCH=cloud_tasks"):
        make_settings(function_role="door", dispatch="direct")
