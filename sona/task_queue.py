"""Cloud Tasks: one HTTP task per run of a job, created over the Cloud Tasks v2 REST API.

Each task calls the private worker (run_job, deployed --no-allow-unauthenticated) with an OIDC
token: `httpRequest.oidcToken {serviceAccountEmail, audience}` makes Cloud Tasks mint a Google ID
token for that account and send it as `Authorization: Bearer` (Cloud Tasks, "Create HTTP target
tasks"; the enqueuer needs iam.serviceAccountUser on the account, the account run.invoker on the
worker). Cloud Run checks the token before the request reaches the function, so the worker holds
no secret of its own. For a Cloud Functions URL the audience is the URL itself (Google's
"functions-bearer-token" sample: "For Cloud Functions, endpoint and audience are the same").

The webhook's call is the function's cold path, and `google.cloud.tasks_v2` costs 0.3-0.5 s of
imports (DESIGN.md), so this speaks the same REST call its REST transport makes
(`POST /v2/{queue}/tasks`, the error JSON mapped by status) with the standard library. The local
Cloud Tasks (devstack/emulators/cloud_tasks.py) is checked against the real client and against this one.

A task's name is derived from the job, its attempt and the dispatch round: a duplicate webhook
creates nothing (ALREADY_EXISTS is success), and a re-dispatch gets a new name (executed names
stay reserved for hours).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from sona.config import Settings
from sona.errors import ServiceOutage, TransientError
from sona.tls import tls_context

GOOGLE_API = "https://cloudtasks.googleapis.com"
_METADATA = "http://metadata.google.internal/computeMetadata/v1"
_METADATA_TOKEN_URL = f"{_METADATA}/instance/service-accounts/default/token"

Created = Literal["created", "exists"]
# ListTasks answers at most 1,000 tasks a page.
LIST_PAGE_SIZE = 1000
# The job in a task's name (task_id below).
TASK_JOB = re.compile(r"/tasks/[0-9a-f]{8}-([0-9a-f-]{36})-a\d+-r\d+$")


@dataclass(frozen=True)
class QueueLimits:
    """The queue carries the limits (DESIGN.md, Google Cloud Tasks), for deploy and local stack alike:
    - dispatch rate: the provider budget, well under Stable Audio's 15 per second;
    - concurrency: every slot the function has (instances x jobs per instance), never more;
    - retries: for deliveries Cloud Run refused (429 at max instances, 503) or answers lost; the
      job's own attempts are counted in the database. Backoff starts at 1 s (a slot frees soon),
      doubles up to the lease (a delivery retried after a crash finds the job released), and the
      queue stops after MAX_ATTEMPTS leases' worth of time; reclaim_jobs owns a job after that.

    Cloud Tasks stops retrying only when BOTH max_attempts and max_retry_duration are satisfied
    (Cloud Tasks RetryConfig reference: "When the task has been attempted max_attempts times and
    when the max_retry_duration time has passed, no further attempts are made"), so a large
    max_attempts (the API's default is 100) keeps a failing task going for hours, and a
    max_retry_duration past the last of max_attempts attempts buys one more attempt after it. So
    the window (MAX_ATTEMPTS leases) decides how many attempts the backoff schedule fits, and
    max_retry_duration is the time of the last of them: both limits are met at that attempt."""

    max_dispatches_per_second: float
    max_concurrent_dispatches: int
    lease_s: int
    max_attempts_per_job: int
    min_backoff_s: int = 1
    max_doublings: int = 5

    @property
    def max_backoff_s(self) -> int:
        return self.lease_s

    @property
    def retry_window_s(self) -> int:
        return self.lease_s * self.max_attempts_per_job

    def backoff_s(self, failures: int) -> int:
        """The wait after the failures-th failed attempt: min_backoff doubling max_doublings times,
        then growing linearly by the last doubled step, capped at max_backoff (RetryConfig)."""
        step = failures - 1
        delay: int = self.min_backoff_s * 2 ** min(step, self.max_doublings)
        if step > self.max_doublings:
            delay *= 1 + step - self.max_doublings
        return min(self.max_backoff_s, delay)

    def attempt_times(self) -> list[int]:
        """When each attempt starts, in seconds after the first, while it fits in the window."""
        times = [0]
        while times[-1] + self.backoff_s(len(times)) <= self.retry_window_s:
            times.append(times[-1] + self.backoff_s(len(times)))
        return times

    @property
    def max_attempts(self) -> int:
        return len(self.attempt_times())

    @property
    def max_retry_duration_s(self) -> int:
        """The last attempt's start: once it has failed, both limits are met and the task is gone.
        At least 1 s, since 0 would mean no age limit at all."""
        return max(1, self.attempt_times()[-1])

    def as_queue(self, name: str) -> dict[str, object]:
        """The Queue resource of the Cloud Tasks v2 REST API."""
        return {
            "name": name,
            "rateLimits": {
                "maxDispatchesPerSecond": self.max_dispatches_per_second,
                "maxConcurrentDispatches": self.max_concurrent_dispatches,
            },
            "retryConfig": {
                "maxAttempts": self.max_attempts,
                "maxRetryDuration": f"{self.max_retry_duration_s}s",
                "minBackoff": f"{self.min_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "maxDoublings": self.max_doublings,
            },
        }


def task_id(job_id: uuid.UUID, attempt: int, dispatch_round: int) -> str:
    """A hashed prefix first, as Google advises for named tasks (it spreads them over the
    queue's key space), then what makes the name readable in the console."""
    prefix = hashlib.sha256(str(job_id).encode()).hexdigest()[:8]
    return f"{prefix}-{job_id}-a{attempt}-r{dispatch_round}"


class Http(Protocol):
    def post(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> tuple[int, bytes]: ...

    def get(self, url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]: ...


class OneShotHttp:
    """urllib, one connection per call: light to import, right for one task per webhook."""

    def post(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> tuple[int, bytes]:
        return self._send(urllib.request.Request(url, data=body, headers=headers, method="POST"), timeout_s)  # noqa: S310

    def get(self, url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
        return self._send(urllib.request.Request(url, headers=headers, method="GET"), timeout_s)  # noqa: S310

    @staticmethod
    def _send(request: urllib.request.Request, timeout_s: float) -> tuple[int, bytes]:
        url = request.full_url
        context = tls_context() if url.startswith("https:") else None
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:  # noqa: S310
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


class _AccessToken:
    """The function's own service account token from the metadata server, kept until it is
    about to expire (Cloud Run serves it; no google-auth import on the cold path)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token = ""
        self._expires = 0.0

    def get(self, timeout_s: float) -> str:
        with self._lock:
            if time.monotonic() < self._expires - 60:
                return self._token
            request = urllib.request.Request(_METADATA_TOKEN_URL, headers={"Metadata-Flavor": "Google"})  # noqa: S310
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
                data = json.loads(response.read())
            self._token = str(data["access_token"])
            self._expires = time.monotonic() + float(data.get("expires_in", 300))
            return self._token


@dataclass
class TaskQueue:
    settings: Settings
    http: Http

    def __post_init__(self) -> None:
        self._token = _AccessToken() if self.settings.cloud_tasks_api_url == GOOGLE_API else None

    def enqueue(
        self,
        job_id: uuid.UUID,
        *,
        attempt: int,
        dispatch_round: int = 0,
        not_before: datetime | None = None,
        timeout_s: float = 10.0,
    ) -> tuple[str, Created]:
        """Create the task that runs this job; an existing task of the same name is success."""
        settings = self.settings
        queue = str(settings.cloud_tasks_queue)
        name = f"{queue}/tasks/{task_id(job_id, attempt, dispatch_round)}"
        worker = str(settings.run_job_url)
        task: dict[str, object] = {
            "name": name,
            "dispatchDeadline": f"{settings.dispatch_deadline_s}s",
            "httpRequest": {
                "url": worker,
                "httpMethod": "POST",
                "headers": {"Content-Type": "application/json"},
                "body": base64.b64encode(json.dumps({"job_id": str(job_id)}).encode()).decode(),
                "oidcToken": {"serviceAccountEmail": str(settings.tasks_service_account), "audience": worker},
            },
        }
        if not_before is not None:
            task["scheduleTime"] = not_before.astimezone(UTC).isoformat().replace("+00:00", "Z")
        headers = {"Content-Type": "application/json"}
        try:
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token.get(timeout_s)}"
            status, body = self.http.post(
                f"{settings.cloud_tasks_api_url}/v2/{queue}/tasks",
                headers,
                json.dumps({"task": task, "responseView": "BASIC"}).encode(),
                timeout_s,
            )
        except OSError as exc:  # URLError, timeouts and resets are all OSErrors
            raise TransientError("The job queue is unavailable", detail=type(exc).__name__) from None
        if 200 <= status < 300:
            return name, "created"
        return name, _refused(status, body)

    def jobs_with_a_task(self, timeout_s: float = 30.0, page_size: int = LIST_PAGE_SIZE) -> set[uuid.UUID]:
        """The jobs that have a task in the queue now: waiting, scheduled, running or between its
        retries (ListTasks, 1,000 a page). A task that ran to its end, or that Cloud Tasks gave up
        on, is gone from the list, and only such a job needs a new one."""
        queue = str(self.settings.cloud_tasks_queue)
        found: set[uuid.UUID] = set()
        page = ""
        started = time.monotonic()
        while True:
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                raise TransientError("The job queue could not be listed in time")
            query = urllib.parse.urlencode({"pageSize": page_size, **({"pageToken": page} if page else {})})
            try:
                headers = {"Authorization": f"Bearer {self._token.get(left)}"} if self._token else {}
                status, body = self.http.get(
                    f"{self.settings.cloud_tasks_api_url}/v2/{queue}/tasks?{query}", headers, left
                )
            except OSError as exc:
                raise TransientError("The job queue is unavailable", detail=type(exc).__name__) from None
            if status != 200:
                _refused(status, body)
                raise TransientError("The job queue could not be listed", detail=f"cloud tasks {status}")
            listed = json.loads(body or b"{}")
            for task in listed.get("tasks", []):
                match = TASK_JOB.search(str(task.get("name", "")))
                if match:
                    found.add(uuid.UUID(match.group(1)))
            page = str(listed.get("nextPageToken", ""))
            if not page:
                return found


def _refused(status: int, body: bytes) -> Created:
    """Google's error JSON: {"error": {"code", "message", "status"}}; the kind follows the status."""
    try:
        error = json.loads(body).get("error", {})
        code, message = str(error.get("status", "")), str(error.get("message", ""))
    except (ValueError, AttributeError):
        code, message = "", ""
    if status == 409 or code == "ALREADY_EXISTS":
        return "exists"
    detail = f"cloud tasks {status} {code} {message}".strip()
    if status in (429, 408) or status >= 500:
        raise TransientError("The job queue is busy", detail=detail)
    # 400, 401, 403, 404: the queue, its permissions or the task's shape is misconfigured.
    raise ServiceOutage("The job queue refused the job; the team has been alerted", detail=detail)


class PooledHttp:
    """httpx with keep-alive connections, for reclaim's bulk enqueue (thousands of tasks in one
    call, many at once); reclaim is not on the webhook's cold path."""

    def __init__(self, connections: int) -> None:
        import httpx

        self._httpx = httpx
        self._client = httpx.Client(
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            verify=tls_context(),
        )

    def post(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> tuple[int, bytes]:
        try:
            response = self._client.post(url, headers=headers, content=body, timeout=timeout_s)
        except self._httpx.HTTPError as exc:
            raise ConnectionError(type(exc).__name__) from None
        return response.status_code, response.content

    def get(self, url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
        try:
            response = self._client.get(url, headers=headers, timeout=timeout_s)
        except self._httpx.HTTPError as exc:
            raise ConnectionError(type(exc).__name__) from None
        return response.status_code, response.content

    def close(self) -> None:
        self._client.close()
