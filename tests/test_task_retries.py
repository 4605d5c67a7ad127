"""How long Cloud Tasks keeps a task, and when reclaim sends another: the retry limit that binds is
the one the queue documents, a task's deadline leaves room for Cloud Run's hold and a cold start,
the queue's limits stay within Cloud Tasks', and reclaim re-dispatches only jobs whose task is gone."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import uuid
from collections.abc import Iterator

import pytest
import requests

from devstack.emulators.cloud_tasks import CloudTasksEmulator, RetryPolicy
from sona.config import ConfigError
from sona.deadline import Deadline
from sona.ops.deploy import Plan, env_flag, make_plan, queue_limits
from sona.reclaim import _enqueue_all
from sona.services import Services
from sona.store.jobs import DueJob
from sona.task_queue import OneShotHttp, QueueLimits, TaskQueue
from tests import fake_gcloud
from tests.support import make_settings
from tests.test_deploy import REPO, deploy_settings

QUEUE = "projects/sona-test/locations/local/queues/sona-jobs"


def deploy_config(**overrides: str) -> Plan:
    return make_plan(deploy_settings(overrides))


def retries_end_after(limits: QueueLimits) -> tuple[int, float]:
    """The attempts a task gets, and the seconds from its first attempt to its last, when every
    attempt fails at once, as the local Cloud Tasks models RetryConfig (both limits must be met)."""
    policy = RetryPolicy(
        max_attempts=limits.max_attempts,
        max_retry_duration=limits.max_retry_duration_s,
        min_backoff=limits.min_backoff_s,
        max_backoff=limits.max_backoff_s,
        max_doublings=limits.max_doublings,
    )
    attempts, now = 1, 0.0
    while not policy.exhausted(attempts, now):
        now += policy.backoff(attempts)
        attempts += 1
    return attempts, now


@pytest.mark.parametrize("job_timeout_ms", ["60000", "300000", "1700000"])
@pytest.mark.parametrize("max_attempts", ["1", "3", "5"])
def test_a_failing_task_gets_exactly_its_max_attempts_and_stops_at_its_max_retry_duration(
    job_timeout_ms: str, max_attempts: str
) -> None:
    """Both limits are met at the same attempt: no extra attempt after max_attempts."""
    limits = queue_limits(deploy_config(JOB_TIMEOUT_MS=job_timeout_ms, MAX_ATTEMPTS=max_attempts))
    assert retries_end_after(limits) == (limits.max_attempts, limits.max_retry_duration_s)
    # the whole window, and at most one backoff past it
    assert limits.retry_window_s <= limits.max_retry_duration_s < limits.retry_window_s + limits.max_backoff_s


def test_the_default_queue_retries_fourteen_times_over_about_twenty_minutes_not_hours() -> None:
    """What DEPLOYMENT.md says: 14 attempts, the last 1183 s (about 20 minutes) after the first."""
    limits = queue_limits(deploy_config())
    assert retries_end_after(limits) == (14, 1183)
    deployment = (REPO / "DEPLOYMENT.md").read_text().replace("\n", " ")
    assert "14 attempts" in deployment and "1183 s" in deployment


@pytest.mark.parametrize(("job_timeout_ms", "deadline"), [(60_000, 100), (300_000, 340), (1_760_000, 1800)])
def test_a_tasks_deadline_leaves_room_for_cloud_runs_hold_and_a_cold_start(
    job_timeout_ms: int, deadline: int
) -> None:
    settings = make_settings(
        dispatch="cloud_tasks",
        cloud_tasks_queue=QUEUE,
        run_job_url="https://w.example/run-job",
        tasks_service_account="t@p.iam.gserviceaccount.com",
        job_timeout_ms=job_timeout_ms,
    )
    assert settings.dispatch_deadline_s == deadline
    assert settings.dispatch_deadline_s >= settings.function_timeout_s + 10 + 20  # hold + cold start


def test_a_deadline_past_thirty_minutes_is_refused() -> None:
    with pytest.raises(ConfigError, match="dispatch deadline of 1810 s"):
        deploy_config(JOB_TIMEOUT_MS="1770000")


def test_more_slots_than_cloud_tasks_dispatches_at_once_are_refused() -> None:
    with pytest.raises(ConfigError, match="above Cloud Tasks' 5000"):
        deploy_config(MAX_INSTANCES="1000", MAX_CONCURRENT_JOBS="6")
    assert deploy_config(MAX_INSTANCES="1000", MAX_CONCURRENT_JOBS="5").config.max_instances == 1000
    assert not deploy_config(MAX_INSTANCES="1000", MAX_CONCURRENT_JOBS="6", DISPATCH="direct").cloud_tasks


@pytest.mark.parametrize(
    "values",
    [
        {"TASKS_SERVICE_ACCOUNT": "sona-tasks@p.iam.gserviceaccount.com", "A": "x,y"},
        {"A": "a|b", "B": "c@d", "C": "e,f"},
        {"A": "|~#", "B": "@"},
    ],
    ids=["an email and a comma", "the first delimiters taken", "all but one taken"],
)
def test_set_env_vars_carries_every_value_whole(values: dict[str, str]) -> None:
    assert fake_gcloud.env_vars(env_flag(values).removeprefix("--set-env-vars=")) == values


def test_set_env_vars_refuses_values_that_leave_no_delimiter() -> None:
    with pytest.raises(ValueError, match="no delimiter"):
        env_flag({"A": "|~#@;"})


# -- reclaim: only jobs whose task is gone ----------------------------------------------------------


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
    requests.post(f"{emulator.url}/v2/{QUEUE}:pause", json={}, timeout=10).raise_for_status()  # a backlog
    yield emulator
    emulator.stop()


@pytest.fixture
def services(tasks: CloudTasksEmulator) -> Iterator[Services]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield Services(
        make_settings(
            dispatch="cloud_tasks",
            cloud_tasks_queue=QUEUE,
            cloud_tasks_api_url=tasks.url,
            run_job_url="http://127.0.0.1:9/run_job",
            tasks_service_account="sona-tasks@sona-test.iam.gserviceaccount.com",
        )
    )
    root.handlers[:] = handlers
    root.setLevel(level)


def listed(tasks: CloudTasksEmulator) -> list[str]:
    names, page = [], ""
    while True:
        answer = requests.get(
            f"{tasks.url}/v2/{QUEUE}/tasks",
            params={"pageSize": 2, **({"pageToken": page} if page else {})},
            timeout=10,
        ).json()
        names += [t["name"] for t in answer.get("tasks", [])]
        page = answer.get("nextPageToken", "")
        if not page:
            return names


def test_reclaim_leaves_a_job_whose_task_still_waits_and_sends_one_whose_task_is_gone(
    tasks: CloudTasksEmulator, services: Services
) -> None:
    waiting, lost = uuid.uuid4(), uuid.uuid4()
    TaskQueue(services.settings, OneShotHttp()).enqueue(waiting, attempt=0)  # the webhook's task
    due = [DueJob(job_id=job, attempt=0, dispatch_round=1) for job in (waiting, lost)]
    summary = _enqueue_all(due, services, Deadline(60))
    assert (summary["dispatched"], summary["still_queued"]) == (1, 1)
    names = listed(tasks)
    assert sum(str(waiting) in n for n in names) == 1  # no second task for the waiting job
    assert next(n for n in names if str(lost) in n).endswith("-a0-r1")


def test_in_a_backlog_longer_than_the_grace_every_reclaim_adds_nothing(
    tasks: CloudTasksEmulator, services: Services
) -> None:
    jobs = [uuid.uuid4() for _ in range(5)]
    queue = TaskQueue(services.settings, OneShotHttp())
    for job in jobs:
        queue.enqueue(job, attempt=0)
    for dispatch_round in (1, 2, 3):
        due = [DueJob(job_id=j, attempt=0, dispatch_round=dispatch_round) for j in jobs]
        assert _enqueue_all(due, services, Deadline(60))["dispatched"] == 0
    assert len(listed(tasks)) == len(jobs)  # read across pages of two


def test_the_list_of_waiting_jobs_spans_every_page(tasks: CloudTasksEmulator, services: Services) -> None:
    jobs = {uuid.uuid4() for _ in range(5)}
    queue = TaskQueue(services.settings, OneShotHttp())
    for job in jobs:
        queue.enqueue(job, attempt=0)
    assert queue.jobs_with_a_task(page_size=2) == jobs
    assert (
        requests.get(f"{tasks.url}/v2/{QUEUE}/tasks", params={"pageSize": 1001}, timeout=10).status_code
        == 400
    )


class RefusingQueue:
    """Cloud Tasks on loopback for a caller whose account lacks cloudtasks.tasks.list: ListTasks
    answers as Google does (403 PERMISSION_DENIED in its error JSON), or a passing 503; every
    CreateTask that gets through is counted."""

    DENIED = (
        'The principal (user or service account) lacks IAM permission "cloudtasks.tasks.list" for '
        "the resource (or the resource may not exist)."
    )

    def __init__(self, list_status: int) -> None:
        self.created: list[bytes] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # ListTasks
                status = "PERMISSION_DENIED" if list_status == 403 else "UNAVAILABLE"
                self._answer(
                    list_status, {"error": {"code": list_status, "message": owner.DENIED, "status": status}}
                )

            def do_POST(self) -> None:  # CreateTask
                owner.created.append(self.rfile.read(int(self.headers["Content-Length"])))
                self._answer(200, {"name": "created"})

            def _answer(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("list_status", "refused"), [(403, 1), (503, 0)], ids=["refused", "unavailable"])
def test_a_queue_that_cannot_be_listed_gets_no_task_and_a_refusal_fails_loudly(
    list_status: int, refused: int, caplog: pytest.LogCaptureFixture
) -> None:
    queue = RefusingQueue(list_status)
    try:
        services = Services(
            make_settings(
                dispatch="cloud_tasks",
                cloud_tasks_queue=QUEUE,
                cloud_tasks_api_url=queue.url,
                run_job_url="http://127.0.0.1:9/run_job",
                tasks_service_account="sona-tasks@sona-test.iam.gserviceaccount.com",
            )
        )
        due = [DueJob(job_id=uuid.uuid4(), attempt=0, dispatch_round=1) for _ in range(3)]
        with caplog.at_level(logging.WARNING):
            summary = _enqueue_all(due, services, Deadline(60))
    finally:
        queue.close()
    assert queue.created == []  # no duplicate task for jobs whose task may well be waiting
    assert (summary["errors"], summary.get("queue_refused", 0)) == (3, refused)
    level = logging.ERROR if refused else logging.WARNING
    assert [r.levelno for r in caplog.records if "queue" in r.getMessage()] == [level]
