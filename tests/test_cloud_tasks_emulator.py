"""The local Cloud Tasks, driven through the real google-cloud-tasks client (REST transport), against a
recording worker on loopback. Limits are asserted from dispatch timestamps, never from wall-clock speed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import tasks_v2
from google.protobuf import duration_pb2, timestamp_pb2
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from devstack.emulators.cloud_tasks import CloudTasksEmulator, RetryPolicy, decode_oidc_token
from devstack.events import CHANGES
from devstack.serving import serve_in_thread, stop_server
from tests.support import ManualClock, wait_until

LOCATION = "projects/sona-local/locations/europe-west1"
SERVICE_ACCOUNT = "process-job@sona-local.iam.gserviceaccount.com"


@dataclass
class Seen:
    task: str
    headers: dict[str, str]
    body: bytes
    started: float
    finished: float = 0.0


@dataclass
class Worker:
    """A task handler on loopback: `answer(task, attempt)` gives (status, seconds to take)."""

    answer: Callable[[str, int], tuple[int, float]] = lambda task, attempt: (200, 0.0)
    retry_after: str = ""  # sent with every non-2xx answer when set
    seen: list[Seen] = field(default_factory=list)
    busy: int = 0
    most_busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        task = request.headers.get("X-CloudTasks-TaskName", "")
        record = Seen(task, dict(request.headers), request.get_data(), time.time())
        with self.lock:
            attempt = sum(1 for s in self.seen if s.task == task)
            self.seen.append(record)
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        CHANGES.notify()
        status, seconds = self.answer(task, attempt)
        time.sleep(seconds)  # the worker's own time to answer, which the test is about
        with self.lock:
            self.busy -= 1
            record.finished = time.time()
        CHANGES.notify()
        headers = {"Retry-After": self.retry_after} if self.retry_after and status >= 300 else {}
        return Response("done", status=status, headers=headers)(environ, start_response)


@pytest.fixture
def worker() -> Iterator[Worker]:
    handler = Worker()
    server = make_server("127.0.0.1", 0, handler, threaded=True)
    serve_in_thread(server, "test-worker")
    handler.url = f"http://127.0.0.1:{server.server_port}/process_job"
    yield handler
    stop_server(server)


@pytest.fixture
def emulator() -> Iterator[CloudTasksEmulator]:
    emu = CloudTasksEmulator(tombstone_s=60.0, min_dispatch_deadline_s=0.2)
    emu.start()
    yield emu
    emu.stop()


def client_for(emu: CloudTasksEmulator) -> tasks_v2.CloudTasksClient:
    return tasks_v2.CloudTasksClient(
        transport="rest", client_options={"api_endpoint": emu.url}, credentials=AnonymousCredentials()
    )


@pytest.fixture
def client(emulator: CloudTasksEmulator) -> tasks_v2.CloudTasksClient:
    return client_for(emulator)


def seconds(value: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(value), nanos=round((value % 1) * 1e9))


def make_queue(
    client: tasks_v2.CloudTasksClient,
    name: str = "jobs",
    *,
    rate: float = 500,
    concurrent: int = 1000,
    max_attempts: int = 5,
    min_backoff: float = 0.1,
    max_backoff: float = 10.0,
    max_doublings: int = 16,
) -> str:
    queue = client.create_queue(
        parent=LOCATION,
        queue=tasks_v2.Queue(
            name=f"{LOCATION}/queues/{name}",
            rate_limits=tasks_v2.RateLimits(
                max_dispatches_per_second=rate, max_concurrent_dispatches=concurrent
            ),
            retry_config=tasks_v2.RetryConfig(
                max_attempts=max_attempts,
                min_backoff=seconds(min_backoff),
                max_backoff=seconds(max_backoff),
                max_doublings=max_doublings,
            ),
        ),
    )
    return str(queue.name)


def add_task(
    client: tasks_v2.CloudTasksClient, queue: str, url: str, task_id: str = "", **fields: Any
) -> tasks_v2.Task:
    request = tasks_v2.HttpRequest(
        url=url,
        body=fields.pop("body", b'{"job_id": "j"}'),
        headers=fields.pop("headers", {"Content-Type": "application/json"}),
        oidc_token=fields.pop("oidc_token", None),
    )
    name = f"{queue}/tasks/{task_id}" if task_id else ""
    return client.create_task(parent=queue, task=tasks_v2.Task(name=name, http_request=request, **fields))


# -- queues -------------------------------------------------------------------------------------
def test_a_queue_keeps_the_limits_it_was_created_with_and_reports_a_burst(
    client: tasks_v2.CloudTasksClient,
) -> None:
    name = make_queue(client, rate=12, concurrent=20, max_attempts=4, min_backoff=1, max_backoff=60)

    queue = client.get_queue(name=name)

    assert queue.rate_limits.max_dispatches_per_second == 12
    assert queue.rate_limits.max_concurrent_dispatches == 20
    assert queue.rate_limits.max_burst_size == 12
    assert queue.retry_config.max_attempts == 4
    assert queue.retry_config.min_backoff.total_seconds() == 1
    assert queue.retry_config.max_backoff.total_seconds() == 60
    assert queue.state == tasks_v2.Queue.State.RUNNING


def test_patching_a_queue_changes_only_the_masked_fields(client: tasks_v2.CloudTasksClient) -> None:
    name = make_queue(client, rate=12, concurrent=20)

    client.update_queue(
        queue=tasks_v2.Queue(name=name, rate_limits=tasks_v2.RateLimits(max_dispatches_per_second=3)),
        update_mask={"paths": ["rate_limits.max_dispatches_per_second"]},
    )

    limits = client.get_queue(name=name).rate_limits
    assert (limits.max_dispatches_per_second, limits.max_concurrent_dispatches) == (3, 20)


def test_patching_a_missing_queue_creates_it(client: tasks_v2.CloudTasksClient) -> None:
    name = f"{LOCATION}/queues/made-by-patch"

    client.update_queue(
        queue=tasks_v2.Queue(name=name, rate_limits=tasks_v2.RateLimits(max_dispatches_per_second=7))
    )

    assert client.get_queue(name=name).rate_limits.max_dispatches_per_second == 7


def test_a_missing_queue_is_not_found(client: tasks_v2.CloudTasksClient) -> None:
    with pytest.raises(exceptions.NotFound):
        client.get_queue(name=f"{LOCATION}/queues/nowhere")


# -- task names ---------------------------------------------------------------------------------
def test_a_named_task_created_twice_is_refused_as_already_exists(
    client: tasks_v2.CloudTasksClient, worker: Worker
) -> None:
    queue = make_queue(client)
    client.pause_queue(name=queue)
    add_task(client, queue, worker.url, "job-1-attempt-1")

    with pytest.raises(exceptions.Conflict) as refused:
        add_task(client, queue, worker.url, "job-1-attempt-1")

    # The REST transport picks the class from the HTTP status (409 -> Conflict, the parent of
    # AlreadyExists); the google.rpc status in the body is what says ALREADY_EXISTS.
    assert refused.value.response.json()["error"]["status"] == "ALREADY_EXISTS"
    assert len(client.list_tasks(parent=queue).tasks) == 1


@pytest.mark.parametrize("ending", ["executed", "deleted"])
def test_a_name_stays_reserved_after_the_task_ends_until_its_tombstone_expires(
    worker: Worker, ending: str
) -> None:
    clock = ManualClock()  # the reservation's hour passes on the emulator's clock, not the test's
    emu = CloudTasksEmulator(tombstone_s=3600.0, clock=clock)
    emu.start()
    try:
        client = client_for(emu)
        queue = make_queue(client)
        if ending == "deleted":
            client.pause_queue(name=queue)
        task = add_task(client, queue, worker.url, "job-2-attempt-1")
        if ending == "deleted":
            client.delete_task(name=task.name)
        assert emu.wait_idle(5)

        with pytest.raises(exceptions.Conflict):
            add_task(client, queue, worker.url, "job-2-attempt-1")
        clock.advance(3600.0 - 0.001)
        with pytest.raises(exceptions.Conflict):
            add_task(client, queue, worker.url, "job-2-attempt-1")
        clock.advance(0.001)
        again = add_task(client, queue, worker.url, "job-2-attempt-1")
    finally:
        emu.stop()

    assert again.name == task.name


def test_an_unnamed_task_gets_a_generated_id(client: tasks_v2.CloudTasksClient, worker: Worker) -> None:
    queue = make_queue(client)
    client.pause_queue(name=queue)

    first = add_task(client, queue, worker.url)
    second = add_task(client, queue, worker.url)

    assert first.name.startswith(f"{queue}/tasks/")
    assert first.name != second.name


@pytest.mark.parametrize("task_id", ["has space", "slash/inside", "x" * 501])
def test_an_invalid_task_id_is_refused(
    client: tasks_v2.CloudTasksClient, worker: Worker, task_id: str
) -> None:
    queue = make_queue(client)

    with pytest.raises(exceptions.BadRequest):
        add_task(client, queue, worker.url, task_id)


@pytest.mark.parametrize("deadline", [14.0, 1801.0])
def test_a_dispatch_deadline_outside_15_s_to_30_min_is_refused(worker: Worker, deadline: float) -> None:
    emu = CloudTasksEmulator()
    emu.start()
    try:
        client = client_for(emu)
        queue = make_queue(client)
        with pytest.raises(exceptions.BadRequest):
            add_task(client, queue, worker.url, dispatch_deadline=seconds(deadline))
    finally:
        emu.stop()


# -- limits -------------------------------------------------------------------------------------
def test_dispatches_never_outrun_the_token_bucket(worker: Worker) -> None:
    rate, burst, count = 8.0, 3, 20
    emu = CloudTasksEmulator(burst_size=burst)
    emu.start()
    try:
        client = client_for(emu)
        queue = make_queue(client, rate=rate)
        client.pause_queue(name=queue)
        for _ in range(count):
            add_task(client, queue, worker.url)
        client.resume_queue(name=queue)
        assert emu.wait_idle(30)
    finally:
        emu.stop()

    starts = sorted(d.started for d in emu.dispatches)
    assert len(starts) == count
    # Any k consecutive dispatches need (k - burst) tokens refilled between the first and the last.
    for i in range(count):
        for j in range(i + burst, count):
            assert starts[j] - starts[i] >= (j - i + 1 - burst) / rate - 0.02
    assert starts[-1] - starts[0] >= (count - burst) / rate - 0.02


def test_concurrent_dispatches_never_exceed_the_cap(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker
) -> None:
    worker.answer = lambda task, attempt: (200, 0.3)
    queue = make_queue(client, concurrent=3)
    for _ in range(9):
        add_task(client, queue, worker.url)

    assert emulator.wait_idle(20)
    assert not client.list_tasks(parent=queue).tasks
    assert worker.most_busy == 3
    assert len(worker.seen) == 9


# -- retries ------------------------------------------------------------------------------------
def test_backoff_doubles_then_grows_linearly_then_caps_as_documented() -> None:
    policy = RetryPolicy(min_backoff=10, max_backoff=300, max_doublings=3)

    assert [policy.backoff(n) for n in range(1, 9)] == [10, 20, 40, 80, 160, 240, 300, 300]


@pytest.mark.parametrize("failure", [500, 429, 503, 404])
def test_a_failed_attempt_is_retried_with_growing_backoff_then_succeeds(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker, failure: int
) -> None:
    worker.answer = lambda task, attempt: (failure if attempt < 2 else 200, 0.0)
    queue = make_queue(client, min_backoff=0.2)
    add_task(client, queue, worker.url, "job-3-attempt-1")

    assert emulator.wait_idle(10)
    gaps = [b.started - a.finished for a, b in zip(worker.seen, worker.seen[1:], strict=False)]
    assert [d.status for d in emulator.attempts("job-3-attempt-1")] == [failure, failure, 200]
    assert gaps[0] >= 0.2 - 0.02
    assert gaps[1] >= 0.4 - 0.02
    assert emulator.completed == [f"{queue}/tasks/job-3-attempt-1"]


def test_a_task_is_given_up_after_max_attempts_and_its_name_stays_reserved(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker
) -> None:
    worker.answer = lambda task, attempt: (500, 0.0)
    queue = make_queue(client, max_attempts=3, min_backoff=0.05)
    add_task(client, queue, worker.url, "job-4-attempt-1")

    # Idle: the task was deleted after its third attempt, so no fourth can come.
    assert emulator.wait_idle(10)

    assert len(worker.seen) == 3
    assert emulator.abandoned == [f"{queue}/tasks/job-4-attempt-1"]
    with pytest.raises(exceptions.Conflict):
        add_task(client, queue, worker.url, "job-4-attempt-1")


def test_a_worker_past_the_dispatch_deadline_is_cut_off_and_retried(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker
) -> None:
    worker.answer = lambda task, attempt: (200, 1.5 if attempt == 0 else 0.0)
    queue = make_queue(client, min_backoff=0.1)
    add_task(client, queue, worker.url, "job-5-attempt-1", dispatch_deadline=seconds(0.4))

    assert emulator.wait_idle(10)
    first, second = emulator.attempts("job-5-attempt-1")

    assert first.cut
    assert first.status is None
    assert 0.35 <= first.finished - first.started < 1.2
    assert second.status == 200


def test_a_retry_after_from_the_worker_is_honoured(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker
) -> None:
    worker.answer = lambda task, attempt: (503 if attempt == 0 else 200, 0.0)
    worker.retry_after = "1"
    queue = make_queue(client, min_backoff=0.05)
    add_task(client, queue, worker.url, "job-6-attempt-1")
    assert emulator.wait_idle(10)

    assert worker.seen[1].started - worker.seen[0].finished >= 1.0 - 0.02


# -- what the worker sees -----------------------------------------------------------------------
def test_the_worker_sees_the_body_and_the_cloud_tasks_headers(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker
) -> None:
    worker.answer = lambda task, attempt: (404 if attempt == 0 else 200, 0.0)
    queue = make_queue(client, name="sona-jobs", min_backoff=0.05)
    task = add_task(
        client,
        queue,
        worker.url,
        "job-7-attempt-1",
        body=b'{"job_id": "7"}',
        headers={"Content-Type": "application/json", "User-Agent": "mine", "X-Google-Thing": "x"},
    )
    assert emulator.wait_idle(10)
    first, second = worker.seen

    assert first.body == b'{"job_id": "7"}'
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"] == "Google-Cloud-Tasks"
    assert "X-Google-Thing" not in first.headers
    assert first.headers["X-Cloudtasks-Queuename"] == "sona-jobs"
    assert first.headers["X-Cloudtasks-Taskname"] == "job-7-attempt-1"
    assert float(first.headers["X-Cloudtasks-Tasketa"]) == pytest.approx(
        task.schedule_time.timestamp(), abs=1e-3
    )
    assert (
        first.headers["X-Cloudtasks-Taskretrycount"],
        first.headers["X-Cloudtasks-Taskexecutioncount"],
    ) == (
        "0",
        "0",
    )
    assert (
        second.headers["X-Cloudtasks-Taskretrycount"],
        second.headers["X-Cloudtasks-Taskexecutioncount"],
    ) == (
        "1",
        "1",
    )
    assert second.headers["X-Cloudtasks-Taskpreviousresponse"] == "404"


def test_a_5xx_answer_is_not_counted_as_an_execution(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker
) -> None:
    worker.answer = lambda task, attempt: (500 if attempt == 0 else 200, 0.0)
    queue = make_queue(client, min_backoff=0.05)
    add_task(client, queue, worker.url, "job-8-attempt-1")
    assert emulator.wait_idle(10)

    retry = worker.seen[1].headers
    assert (retry["X-Cloudtasks-Taskretrycount"], retry["X-Cloudtasks-Taskexecutioncount"]) == ("1", "0")


@pytest.mark.parametrize("audience", ["", "https://process-job.example.run.app"])
def test_an_oidc_token_carries_googles_claims_for_the_service_account(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker, audience: str
) -> None:
    queue = make_queue(client)
    token = tasks_v2.OidcToken(service_account_email=SERVICE_ACCOUNT, audience=audience)
    add_task(client, queue, worker.url, oidc_token=token)
    assert emulator.wait_idle(10)

    scheme, jwt = worker.seen[0].headers["Authorization"].split(" ")
    claims = decode_oidc_token(jwt, emulator.oidc_key)

    assert scheme == "Bearer"
    assert claims is not None
    assert claims["aud"] == (audience or worker.url)
    assert claims["iss"] == "https://accounts.google.com"
    assert (claims["email"], claims["email_verified"]) == (SERVICE_ACCOUNT, True)
    assert claims["exp"] - claims["iat"] == 3600
    assert decode_oidc_token(jwt, b"some other key") is None


def test_a_future_schedule_time_holds_the_task_until_then(
    emulator: CloudTasksEmulator, client: tasks_v2.CloudTasksClient, worker: Worker
) -> None:
    queue = make_queue(client)
    when = time.time() + 0.8
    eta = timestamp_pb2.Timestamp()
    eta.FromNanoseconds(int(when * 1e9))
    add_task(client, queue, worker.url, schedule_time=eta)

    assert emulator.wait_idle(10)
    assert worker.seen[0].started >= when - 0.01


# -- lifecycle ----------------------------------------------------------------------------------
def test_stop_cuts_running_attempts_and_leaves_no_thread(worker: Worker) -> None:
    worker.answer = lambda task, attempt: (200, 5.0)
    emu = CloudTasksEmulator()
    emu.start()
    client = client_for(emu)
    queue = make_queue(client)
    for _ in range(3):
        add_task(client, queue, worker.url)
    wait_until(lambda: len(worker.seen) == 3, timeout_s=10)

    began = time.monotonic()
    emu.stop()

    assert time.monotonic() - began < 2
    assert not [t for t in threading.enumerate() if t.name.startswith("cloud-tasks")]
