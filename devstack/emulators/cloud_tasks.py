"""A local Google Cloud Tasks (v2 REST) that the real `google-cloud-tasks` client talks to.

Measured and documented facts it honours (docs/outside-services.md "Google Cloud Tasks"; the v2 protos shipped
in google-cloud-tasks 2.26.0; the REST transport in google/cloud/tasks_v2/.../transports/rest.py):
- Wire: JSON over HTTP/1.1 at /v2/{name}, camelCase fields, Durations as "1.5s", Timestamps RFC 3339,
  bytes base64; the client asks `$alt=json;enum-encoding=int` and then gets enums as numbers. Errors
  are google.rpc.Status JSON `{"error": {"code", "message", "status"}}`; the client picks its
  exception from the HTTP status alone (409 -> `Conflict`, the parent of `AlreadyExists`; 404 ->
  `NotFound`), so the body's `status` is what says ALREADY_EXISTS.
- Named tasks de-duplicate: creating a name that exists, or that was executed or deleted recently,
  answers 409 ALREADY_EXISTS "The task cannot be created because a task with this name existed too
  recently..." (names stay reserved about 1 h, up to 4 h; `tombstone_s` here). Ids are letters,
  digits, `-`, `_`, at most 500 characters. An unnamed task gets a generated numeric id.
- Queue `rate_limits`: a token bucket of `max_burst_size` tokens (output only, chosen by Cloud Tasks
  from the rate: public `gcloud describe` outputs show 1/s -> 10 and 500/s -> 100; between those this
  uses min(100, max(10, ceil(rate))), override with `burst_size`) refilled at
  `max_dispatches_per_second` (at most 500), and at most `max_concurrent_dispatches` (at most 5000)
  in flight. Retries count against both.
- Defaults of a queue created through the API: 500/s, 1000 concurrent, max_attempts 100,
  min_backoff 0.1 s, max_backoff 3600 s, max_doublings 16, max_retry_duration 0 (unlimited).
- Any non-2xx answer, no answer, or a missed `dispatch_deadline` (default 10 min; 15 s to 30 min)
  is retried: min_backoff doubling `max_doublings` times, then growing linearly by that step, capped
  at max_backoff. A worker's `Retry-After` is honoured. The task is deleted (and its name kept
  reserved) once it has been attempted `max_attempts` times (-1: unlimited) AND
  `max_retry_duration` (0: unlimited) has passed since its first attempt.
- The worker sees `User-Agent: Google-Cloud-Tasks`, `X-CloudTasks-QueueName`, `-TaskName` (short
  ids), `-TaskRetryCount` (attempts before this one), `-TaskExecutionCount` (earlier answers that were
  not 5xx), `-TaskETA` (schedule time, seconds since the epoch), and `-TaskPreviousResponse` on a
  retry. Host, Content-Length, User-Agent, X-Google-* and X-AppEngine-* from the task are replaced or
  dropped; Content-Type is never set for you. A body is allowed for POST, PUT and PATCH only.
- `oidc_token` adds `Authorization: Bearer <ID token>` with Google's claims (iss
  https://accounts.google.com, aud = the audience or else the task URL, email, email_verified, sub,
  azp, iat, exp one hour on). Google signs RS256; this one is HS256 with `oidc_key`, which the local
  stack can check with `decode_oidc_token`.
- `schedule_time` in the future holds the task; in the past or unset means now.
- ListTasks answers pages of `page_size` tasks ("The maximum page size is 1000. If unspecified, the
  page size will be the maximum") with `next_page_token` while more remain; a task is listed from
  its creation until it succeeds or is deleted after its last attempt.

Where it is knowingly simpler: fractions of a second in durations are kept (Google truncates
backoffs to whole seconds) so tests can run in scaled time; `min_dispatch_deadline_s` may be lowered
for the same reason; no system throttling or slow ramp-up on 429/503; redirects are not followed;
App Engine targets, RunTask and IAM are not served.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import math
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel
from werkzeug.serving import BaseWSGIServer
from werkzeug.wrappers import Request, Response

from devstack.events import CHANGES
from devstack.serving import serve_wsgi, stop_server

LIST_PAGE_MAX = 1000  # ListTasks: "The maximum page size is 1000"
TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
QUEUE_ID = re.compile(r"^[A-Za-z0-9-]{1,100}$")
PARENT = re.compile(r"^projects/[^/]+/locations/[^/]+$")
METHODS = ["HTTP_METHOD_UNSPECIFIED", "POST", "GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]
STATES = ["STATE_UNSPECIFIED", "RUNNING", "PAUSED", "DISABLED"]
DROPPED_HEADERS = ("host", "content-length", "user-agent")
DROPPED_PREFIXES = ("x-google-", "x-appengine-")
DUPLICATE_TASK = (
    "The task cannot be created because a task with this name existed too recently. For more "
    "information about task de-duplication see https://cloud.google.com/tasks/docs/reference/rest/v2/"
    "projects.locations.queues.tasks/create#body.request_body.FIELDS.task."
)
NO_QUEUE = (
    "Queue does not exist. If you just created the queue, wait at least a minute for the queue to initialize."
)


# -- the wire (JSON names as the REST transport sends them) ---------------------------------------
class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class RateLimitsWire(_Wire):
    max_dispatches_per_second: float | None = None
    max_concurrent_dispatches: int | None = None  # max_burst_size is output only: ignored on input


class RetryConfigWire(_Wire):
    max_attempts: int | None = None
    max_retry_duration: str | None = None
    min_backoff: str | None = None
    max_backoff: str | None = None
    max_doublings: int | None = None


class QueueWire(_Wire):
    name: str = ""
    rate_limits: RateLimitsWire | None = None
    retry_config: RetryConfigWire | None = None


class OidcTokenWire(_Wire):
    service_account_email: str = ""
    audience: str = ""


class HttpRequestWire(_Wire):
    url: str
    http_method: int | str = 0
    headers: dict[str, str] = {}
    body: str = ""
    oidc_token: OidcTokenWire | None = None


class TaskWire(_Wire):
    name: str = ""
    http_request: HttpRequestWire | None = None
    schedule_time: str | None = None
    dispatch_deadline: str | None = None


class CreateTaskWire(_Wire):
    task: TaskWire


class ApiError(Exception):
    """An answer in google.rpc.Status form."""

    def __init__(self, code: int, status: str, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", message)


def parse_duration(text: str | None, what: str) -> float | None:
    if text is None:
        return None
    match = re.fullmatch(r"(-?\d+(?:\.\d{1,9})?)s", text)
    if match is None:
        raise _invalid(f"Invalid duration for {what}: {text!r}")
    return float(match.group(1))


def format_duration(seconds: float) -> str:
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def parse_timestamp(text: str) -> float:
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        raise _invalid(f"Invalid timestamp: {text!r}")
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    whole: float = datetime.fromisoformat(match.group(1) + zone).timestamp()
    return whole + float("0." + (match.group(2) or "0"))


def format_timestamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- the queue's policy -----------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    max_attempts: int = 100
    max_retry_duration: float = 0.0
    min_backoff: float = 0.1
    max_backoff: float = 3600.0
    max_doublings: int = 16

    def backoff(self, failures: int) -> float:
        """The wait after the `failures`-th failed attempt: doubling, then linear, then capped."""
        step = failures - 1
        if step <= self.max_doublings:
            delay: float = self.min_backoff * 2**step
        else:
            base = self.min_backoff * 2**self.max_doublings
            delay = base * (1 + step - self.max_doublings)
        return min(self.max_backoff, delay)

    def exhausted(self, attempts: int, since_first_s: float) -> bool:
        """Both limits must be met before Cloud Tasks stops retrying."""
        attempts_met = self.max_attempts != -1 and attempts >= self.max_attempts
        duration_met = self.max_retry_duration == 0 or since_first_s >= self.max_retry_duration
        return attempts_met and duration_met


def default_burst(rate: float) -> int:
    return min(100, max(10, math.ceil(rate)))


@dataclass
class Attempt:
    schedule_time: float
    dispatch_time: float
    response_time: float | None = None
    status: int | None = None  # the worker's HTTP status; None: no answer
    cut: bool = False  # the dispatch deadline passed
    conn: http.client.HTTPConnection | None = None

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scheduleTime": format_timestamp(self.schedule_time),
            "dispatchTime": format_timestamp(self.dispatch_time),
        }
        if self.response_time is not None:
            out["responseTime"] = format_timestamp(self.response_time)
        if self.cut:
            out["responseStatus"] = {"code": 4, "message": "DEADLINE_EXCEEDED"}
        elif self.status is None:
            out["responseStatus"] = {"code": 14, "message": "UNAVAILABLE"}
        elif not 200 <= self.status < 300:
            out["responseStatus"] = {"code": 2, "message": f"HTTP status code {self.status}"}
        return out


@dataclass
class TaskState:
    name: str
    request: HttpRequestWire
    body: bytes
    schedule_time: float
    create_time: float
    deadline_s: float
    dispatch_count: int = 0
    response_count: int = 0
    execution_count: int = 0  # answers that were not 5xx
    first_attempt: Attempt | None = None
    last_attempt: Attempt | None = None
    running: Attempt | None = None
    order: int = 0

    @property
    def short(self) -> str:
        return self.name.rsplit("/", 1)[1]

    def wire(self, full: bool, numeric: bool) -> dict[str, Any]:
        request: dict[str, Any] = {
            "url": self.request.url,
            "httpMethod": _enum(METHODS, _method_index(self.request.http_method), numeric),
            "headers": self.request.headers,
        }
        if self.request.oidc_token is not None:
            request["oidcToken"] = self.request.oidc_token.model_dump(by_alias=True)
        if full and self.body:
            request["body"] = base64.b64encode(self.body).decode()
        out: dict[str, Any] = {
            "name": self.name,
            "httpRequest": request,
            "scheduleTime": format_timestamp(self.schedule_time),
            "createTime": format_timestamp(self.create_time),
            "dispatchDeadline": format_duration(self.deadline_s),
            "dispatchCount": self.dispatch_count,
            "responseCount": self.response_count,
            "view": _enum(["VIEW_UNSPECIFIED", "BASIC", "FULL"], 2 if full else 1, numeric),
        }
        if self.first_attempt is not None:
            out["firstAttempt"] = self.first_attempt.wire()
        if self.last_attempt is not None:
            out["lastAttempt"] = self.last_attempt.wire()
        return out


@dataclass
class QueueState:
    name: str
    rate: float = 500.0
    max_concurrent: int = 1000
    burst: int = 100
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    state: str = "RUNNING"
    tokens: float = 100.0
    refilled_at: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    tasks: dict[str, TaskState] = field(default_factory=dict)
    tombstones: dict[str, float] = field(default_factory=dict)  # name -> expiry on the emulator's clock

    def wire(self, numeric: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "rateLimits": {
                "maxDispatchesPerSecond": self.rate,
                "maxBurstSize": self.burst,
                "maxConcurrentDispatches": self.max_concurrent,
            },
            "retryConfig": {
                "maxAttempts": self.retry.max_attempts,
                "maxRetryDuration": format_duration(self.retry.max_retry_duration),
                "minBackoff": format_duration(self.retry.min_backoff),
                "maxBackoff": format_duration(self.retry.max_backoff),
                "maxDoublings": self.retry.max_doublings,
            },
            "state": _enum(STATES, STATES.index(self.state), numeric),
        }

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now


def _enum(names: list[str], index: int, numeric: bool) -> int | str:
    return index if numeric else names[index]


def _method_index(value: int | str) -> int:
    index = value if isinstance(value, int) else METHODS.index(value) if value in METHODS else -1
    if not 0 <= index < len(METHODS):
        raise _invalid(f"Invalid http_method: {value!r}")
    return index or 1  # unspecified means POST


@dataclass(frozen=True)
class Dispatch:
    """One attempt as the worker saw it, for tests: when it started and ended, and its outcome."""

    queue: str
    task: str
    retry_count: int
    started: float
    finished: float
    status: int | None
    cut: bool
    created: float = 0.0  # when the task was created (epoch seconds, as started and finished)


# -- OIDC ---------------------------------------------------------------------------------------
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_oidc_token(key: bytes, email: str, audience: str, now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    subject = str(int(hashlib.sha256(email.encode()).hexdigest(), 16))[:21]
    claims = {
        "aud": audience,
        "azp": subject,
        "email": email,
        "email_verified": True,
        "exp": issued + 3600,
        "iat": issued,
        "iss": "https://accounts.google.com",
        "sub": subject,
    }
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


def decode_oidc_token(token: str, key: bytes) -> dict[str, Any] | None:
    """The claims of a token this emulator minted, or None if it was not signed with `key`."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _unb64(parts[2])):
        return None
    claims: dict[str, Any] = json.loads(_unb64(parts[1]))
    return claims


# -- the service --------------------------------------------------------------------------------
class CloudTasksEmulator:
    """start() serves the REST API on loopback and dispatches tasks; stop() leaves no thread."""

    def __init__(
        self,
        *,
        tombstone_s: float = 3600.0,
        burst_size: int | None = None,
        min_dispatch_deadline_s: float = 15.0,
        oidc_key: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` keeps the names' reservations (a test moves it on instead of waiting an hour)."""
        self.tombstone_s = tombstone_s
        self.clock = clock
        self.burst_size = burst_size
        self.min_dispatch_deadline_s = min_dispatch_deadline_s
        self.oidc_key = oidc_key or secrets.token_bytes(32)
        self.queues: dict[str, QueueState] = {}
        self.dispatches: list[Dispatch] = []
        self.completed: list[str] = []  # task names that got a 2xx
        self.abandoned: list[str] = []  # task names deleted after their last failed attempt
        self._max_in_flight: dict[str, int] = {}
        self._cond = threading.Condition(threading.RLock())  # re-entrant: handlers nest lookups
        self._order = 0
        self._stopping = False
        self._scheduler: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._server: BaseWSGIServer | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server, self.url = serve_wsgi(self, host, port, "cloud-tasks")
        self._scheduler = threading.Thread(
            target=self._schedule_loop, name="cloud-tasks-dispatch", daemon=True
        )
        self._scheduler.start()
        return self.url

    def stop(self) -> None:
        stop_server(self._server)
        self._server = None
        with self._cond:
            self._stopping = True
            for queue in self.queues.values():
                for task in queue.tasks.values():
                    if task.running is not None:
                        _cut(task.running)
            self._changed()
            workers = list(self._workers)
        if self._scheduler is not None:
            self._scheduler.join()
        for worker in workers:
            worker.join()

    def _changed(self) -> None:
        """Under the lock: wake this emulator's own waits and whoever waits on the stack's changes."""
        self._cond.notify_all()
        CHANGES.notify()

    # -- inspection for tests ----------------------------------------------------------------
    def attempts(self, task_id: str) -> list[Dispatch]:
        with self._cond:
            return [d for d in self.dispatches if d.task == task_id]

    def max_in_flight(self, queue_id: str) -> int:
        with self._cond:
            return self._max_in_flight.get(queue_id, 0)

    def pending(self) -> int:
        with self._cond:
            return sum(len(q.tasks) for q in self.queues.values())

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no queue holds a task (all completed or abandoned) within the timeout."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while any(q.tasks for q in self.queues.values()):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- REST ----------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        numeric = "enum-encoding=int" in request.args.get("$alt", "")
        try:
            body, status = self._route(request, numeric)
        except ApiError as error:
            body = {"error": {"code": error.code, "message": error.message, "status": error.status}}
            status = error.code
        response = Response(json.dumps(body), status=status, content_type="application/json; charset=UTF-8")
        return response(environ, start_response)

    def _route(self, request: Request, numeric: bool) -> tuple[dict[str, Any], int]:
        path = request.path.removeprefix("/v2/")
        method = request.method
        parts = path.split("/")
        if len(parts) == 5 and parts[4] == "queues" and PARENT.match("/".join(parts[:4])):
            if method == "POST":
                return self.create_queue("/".join(parts[:4]), _parse(QueueWire, request), numeric), 200
            if method == "GET":
                return self._list_queues("/".join(parts[:4]), numeric), 200
        if len(parts) == 6 and parts[4] == "queues":
            name, _, verb = path.partition(":")
            if method == "GET" and not verb:
                return self._queue(name).wire(numeric), 200
            if method == "PATCH" and not verb:
                mask = request.args.get("updateMask", "")
                return self.update_queue(
                    name, request.get_json(force=True, silent=True) or {}, mask, numeric
                ), 200
            if method == "DELETE" and not verb:
                return self._delete_queue(name), 200
            if method == "POST" and verb in ("pause", "resume"):
                return self._set_state(name, "PAUSED" if verb == "pause" else "RUNNING", numeric), 200
        if len(parts) == 7 and parts[6] == "tasks":
            if method == "POST":
                return self.create_task(
                    path.removesuffix("/tasks"), _parse(CreateTaskWire, request), numeric
                ), 200
            if method == "GET":
                return self._list_tasks(path.removesuffix("/tasks"), request, numeric), 200
        if len(parts) == 8 and parts[6] == "tasks":
            full = request.args.get("responseView") in ("2", "FULL")
            if method == "GET":
                return self._task(path).wire(full, numeric), 200
            if method == "DELETE":
                return self._delete_task(path), 200
        raise ApiError(404, "NOT_FOUND", f"Method not found: {method} /v2/{path}")

    # -- queues ----------------------------------------------------------------------------------
    def create_queue(self, parent: str, wire: QueueWire, numeric: bool) -> dict[str, Any]:
        queue_id = wire.name.removeprefix(f"{parent}/queues/")
        if not QUEUE_ID.match(queue_id):
            raise _invalid(f"Invalid queue name: {wire.name!r}")
        name = f"{parent}/queues/{queue_id}"
        with self._cond:
            if name in self.queues:
                raise ApiError(409, "ALREADY_EXISTS", "Queue already exists")
            queue = QueueState(name)
            self._configure(queue, wire)
            self.queues[name] = queue
            return queue.wire(numeric)

    def update_queue(self, name: str, patch: dict[str, Any], mask: str, numeric: bool) -> dict[str, Any]:
        """PATCH: the fields in updateMask (all given fields without one); creates a missing queue,
        as the real UpdateQueue does."""
        with self._cond:
            queue = self.queues.get(name)
            if queue is None:
                parent = name.rsplit("/queues/", 1)[0]
                return self.create_queue(parent, QueueWire.model_validate({**patch, "name": name}), numeric)
            merged = queue.wire(numeric=False)
            for path in [p for p in mask.split(",") if p] or list(patch):
                _copy_path(patch, merged, [to_camel(piece) for piece in path.split(".")])
            self._configure(queue, QueueWire.model_validate(merged))
            self._changed()
            return queue.wire(numeric)

    def _configure(self, queue: QueueState, wire: QueueWire) -> None:
        limits = wire.rate_limits or RateLimitsWire()
        rate = (
            limits.max_dispatches_per_second if limits.max_dispatches_per_second is not None else queue.rate
        )
        concurrent = limits.max_concurrent_dispatches
        concurrent = concurrent if concurrent is not None else queue.max_concurrent
        if not 0 < rate <= 500:
            raise _invalid("max_dispatches_per_second must be greater than 0 and at most 500")
        if not 1 <= concurrent <= 5000:
            raise _invalid("max_concurrent_dispatches must be between 1 and 5000")
        retry = wire.retry_config or RetryConfigWire()
        policy = RetryPolicy(
            max_attempts=retry.max_attempts if retry.max_attempts is not None else queue.retry.max_attempts,
            max_retry_duration=_or(
                parse_duration(retry.max_retry_duration, "max_retry_duration"), queue.retry.max_retry_duration
            ),
            min_backoff=_or(parse_duration(retry.min_backoff, "min_backoff"), queue.retry.min_backoff),
            max_backoff=_or(parse_duration(retry.max_backoff, "max_backoff"), queue.retry.max_backoff),
            max_doublings=retry.max_doublings
            if retry.max_doublings is not None
            else queue.retry.max_doublings,
        )
        if policy.max_attempts < -1 or policy.max_doublings < 0 or policy.min_backoff > policy.max_backoff:
            raise _invalid("Invalid retry_config")
        queue.rate, queue.max_concurrent, queue.retry = rate, concurrent, policy
        queue.burst = self.burst_size or default_burst(rate)
        queue.tokens = min(queue.tokens, queue.burst)

    def _queue(self, name: str) -> QueueState:
        with self._cond:
            queue = self.queues.get(name)
            if queue is None:
                raise ApiError(404, "NOT_FOUND", NO_QUEUE)
            return queue

    def _list_queues(self, parent: str, numeric: bool) -> dict[str, Any]:
        with self._cond:
            found = [q.wire(numeric) for n, q in self.queues.items() if n.startswith(parent + "/")]
        return {"queues": found} if found else {}

    def _delete_queue(self, name: str) -> dict[str, Any]:
        with self._cond:
            self._queue(name)
            del self.queues[name]
        return {}

    def _set_state(self, name: str, state: str, numeric: bool) -> dict[str, Any]:
        with self._cond:
            queue = self._queue(name)
            queue.state = state
            self._changed()
            return queue.wire(numeric)

    # -- tasks -----------------------------------------------------------------------------------
    def create_task(self, parent: str, wire: CreateTaskWire, numeric: bool) -> dict[str, Any]:
        now = time.time()
        with self._cond:
            queue = self._queue(parent)
            name = self._task_name(queue, wire.task.name)
            task = self._new_task(name, wire.task, now)
            self._order += 1
            task.order = self._order
            queue.tasks[name] = task
            self._changed()
            return task.wire(full=False, numeric=numeric)

    def _task_name(self, queue: QueueState, given: str) -> str:
        if not given:
            return f"{queue.name}/tasks/{secrets.randbelow(10**19) + 10**19}"
        prefix = f"{queue.name}/tasks/"
        if not given.startswith(prefix) or not TASK_ID.match(given.removeprefix(prefix)):
            raise _invalid(f"Invalid task name: {given!r}")
        expiry = queue.tombstones.get(given)
        if given in queue.tasks or (expiry is not None and expiry > self.clock()):
            raise ApiError(409, "ALREADY_EXISTS", DUPLICATE_TASK)
        return given

    def _new_task(self, name: str, wire: TaskWire, now: float) -> TaskState:
        request = wire.http_request
        if request is None:
            raise _invalid("Only HTTP tasks (http_request) are served here")
        if not request.url.startswith(("http://", "https://")):
            raise _invalid("HttpRequest.url must begin with http:// or https://")
        method = METHODS[_method_index(request.http_method)]
        body = base64.b64decode(request.body) if request.body else b""
        if body and method not in ("POST", "PUT", "PATCH"):
            raise _invalid("A request body is allowed only for POST, PUT and PATCH")
        if request.oidc_token is not None and not request.oidc_token.service_account_email:
            raise _invalid("oidc_token.service_account_email is required")
        deadline = _or(parse_duration(wire.dispatch_deadline, "dispatch_deadline"), 600.0)
        if not self.min_dispatch_deadline_s <= deadline <= 1800:
            raise _invalid("dispatch_deadline must be between 15 seconds and 30 minutes")
        schedule = max(now, parse_timestamp(wire.schedule_time)) if wire.schedule_time else now
        return TaskState(name, request, body, schedule, now, deadline)

    def _task(self, name: str) -> TaskState:
        with self._cond:
            task = self._queue(name.rsplit("/tasks/", 1)[0]).tasks.get(name)
            if task is None:
                raise ApiError(404, "NOT_FOUND", "Requested entity was not found.")
            return task

    def _list_tasks(self, parent: str, request: Request, numeric: bool) -> dict[str, Any]:
        """Pages of `pageSize` tasks (default and maximum 1000); `nextPageToken` while more remain."""
        full = request.args.get("responseView") in ("2", "FULL")
        try:
            size = int(request.args.get("pageSize") or LIST_PAGE_MAX)
            start = int(_unb64(request.args["pageToken"]).decode()) if request.args.get("pageToken") else 0
        except ValueError:
            raise _invalid("Invalid pageSize or pageToken") from None
        if not 0 < size <= LIST_PAGE_MAX:
            raise _invalid(f"pageSize must be 1 to {LIST_PAGE_MAX}")
        with self._cond:
            tasks = sorted(self._queue(parent).tasks.values(), key=lambda t: (t.schedule_time, t.order))
            found = [t.wire(full, numeric) for t in tasks[start : start + size]]
            more = start + size < len(tasks)
        answer: dict[str, Any] = {"tasks": found} if found else {}
        if more:
            answer["nextPageToken"] = _b64(str(start + size).encode())
        return answer

    def _delete_task(self, name: str) -> dict[str, Any]:
        with self._cond:
            task = self._task(name)
            queue = self.queues[name.rsplit("/tasks/", 1)[0]]
            del queue.tasks[name]
            queue.tombstones[name] = self.clock() + self.tombstone_s
            if task.running is not None:
                _cut(task.running)
            self._changed()
        return {}

    # -- dispatch --------------------------------------------------------------------------------
    def _schedule_loop(self) -> None:
        with self._cond:
            while not self._stopping:
                wait = min(0.5, self._cut_overdue(), *(self._dispatch_due(q) for q in self.queues.values()))
                self._cond.wait(max(0.001, wait))

    def _cut_overdue(self) -> float:
        """Cancel attempts past their dispatch deadline; seconds until the next deadline."""
        now = time.time()
        soonest = 0.5
        for queue in self.queues.values():
            for task in queue.tasks.values():
                attempt = task.running
                if attempt is None or attempt.cut:
                    continue
                left = attempt.dispatch_time + task.deadline_s - now
                if left <= 0:
                    _cut(attempt)
                else:
                    soonest = min(soonest, left)
        return soonest

    def _dispatch_due(self, queue: QueueState) -> float:
        """Start what the limits allow now; seconds until something more could start."""
        if queue.state != "RUNNING":
            return 0.5
        now = time.time()
        queue.refill(time.monotonic())
        waiting = sorted(
            (t for t in queue.tasks.values() if t.running is None), key=lambda t: (t.schedule_time, t.order)
        )
        for task in waiting:
            if task.schedule_time > now:
                return task.schedule_time - now
            if queue.in_flight >= queue.max_concurrent:
                return 0.5  # a finishing attempt notifies
            if queue.tokens < 1:
                return (1 - queue.tokens) / queue.rate
            queue.tokens -= 1
            self._start(queue, task, now)
        return 0.5

    def _start(self, queue: QueueState, task: TaskState, now: float) -> None:
        attempt = Attempt(schedule_time=task.schedule_time, dispatch_time=now)
        headers = self._headers(queue, task)
        task.running = attempt
        task.dispatch_count += 1
        task.first_attempt = task.first_attempt or attempt
        queue.in_flight += 1
        short = queue.name.rsplit("/", 1)[1]
        self._max_in_flight[short] = max(self._max_in_flight.get(short, 0), queue.in_flight)
        worker = threading.Thread(
            target=self._attempt,
            args=(queue, task, attempt, headers),
            name="cloud-tasks-attempt",
            daemon=True,
        )
        self._workers.add(worker)
        worker.start()

    def _headers(self, queue: QueueState, task: TaskState) -> dict[str, str]:
        headers = {
            k: v
            for k, v in task.request.headers.items()
            if k.lower() not in DROPPED_HEADERS and not k.lower().startswith(DROPPED_PREFIXES)
        }
        headers.update(
            {
                "User-Agent": "Google-Cloud-Tasks",
                "X-CloudTasks-QueueName": queue.name.rsplit("/", 1)[1],
                "X-CloudTasks-TaskName": task.short,
                "X-CloudTasks-TaskRetryCount": str(task.dispatch_count),
                "X-CloudTasks-TaskExecutionCount": str(task.execution_count),
                "X-CloudTasks-TaskETA": f"{task.schedule_time:.6f}",
            }
        )
        if task.last_attempt is not None and task.last_attempt.status is not None:
            headers["X-CloudTasks-TaskPreviousResponse"] = str(task.last_attempt.status)
        token = task.request.oidc_token
        if token is not None:
            audience = token.audience or task.request.url
            headers["Authorization"] = (
                f"Bearer {mint_oidc_token(self.oidc_key, token.service_account_email, audience)}"
            )
        return headers

    def _attempt(self, queue: QueueState, task: TaskState, attempt: Attempt, headers: dict[str, str]) -> None:
        retry_after = self._send(task, attempt, headers)
        with self._cond:
            attempt.response_time = time.time() if attempt.status is not None else None
            self._settle(queue, task, attempt, retry_after)
            self._workers.discard(threading.current_thread())
            self._changed()

    def _send(self, task: TaskState, attempt: Attempt, headers: dict[str, str]) -> float:
        """POST (or the task's method) to the worker; fills attempt.status; returns Retry-After."""
        url = urlsplit(task.request.url)
        kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = kind(url.hostname or "", url.port, timeout=task.deadline_s)
        try:
            conn.connect()
            with self._cond:
                attempt.conn = conn
                if attempt.cut:
                    return 0.0
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            method = METHODS[_method_index(task.request.http_method)]
            conn.request(method, target, body=task.body or None, headers=headers)
            response = conn.getresponse()
            response.read()
            if not attempt.cut:
                attempt.status = response.status
            return _retry_after(response.getheader("Retry-After"))
        except TimeoutError:
            attempt.cut = True  # the socket's own timeout is the same dispatch deadline
            return 0.0
        except (OSError, http.client.HTTPException):
            return 0.0
        finally:
            conn.close()

    def _settle(self, queue: QueueState, task: TaskState, attempt: Attempt, retry_after: float) -> None:
        queue.in_flight -= 1
        task.running = None
        task.last_attempt = attempt
        self.dispatches.append(
            Dispatch(
                queue.name.rsplit("/", 1)[1],
                task.short,
                task.dispatch_count - 1,
                attempt.dispatch_time,
                time.time(),
                attempt.status,
                attempt.cut,
                task.create_time,
            )
        )
        if task.name not in queue.tasks:
            return  # deleted while it ran
        if attempt.status is not None:
            task.response_count += 1
            task.execution_count += attempt.status < 500
        if attempt.status is not None and 200 <= attempt.status < 300:
            self._retire(queue, task, self.completed)
            return
        first = task.first_attempt.dispatch_time if task.first_attempt else attempt.dispatch_time
        if queue.retry.exhausted(task.dispatch_count, time.time() - first):
            self._retire(queue, task, self.abandoned)
            return
        task.schedule_time = time.time() + max(queue.retry.backoff(task.dispatch_count), retry_after)

    def _retire(self, queue: QueueState, task: TaskState, into: list[str]) -> None:
        del queue.tasks[task.name]
        queue.tombstones[task.name] = self.clock() + self.tombstone_s
        into.append(task.name)


def _cut(attempt: Attempt) -> None:
    """End an attempt now: its worker stops listening, as Cloud Tasks does at the deadline."""
    attempt.cut = True
    sock = attempt.conn.sock if attempt.conn is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date is ignored


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _copy_path(source: dict[str, Any], target: dict[str, Any], path: list[str]) -> None:
    head, rest = path[0], path[1:]
    if head not in source:
        target.pop(head, None)
    elif not rest or not isinstance(source[head], dict):
        target[head] = source[head]
    else:
        _copy_path(source[head], target.setdefault(head, {}), rest)


def _parse(model: type[_Wire], request: Request) -> Any:
    try:
        return model.model_validate(request.get_json(force=True, silent=True) or {})
    except ValidationError as error:
        raise _invalid(str(error).splitlines()[0]) from None
