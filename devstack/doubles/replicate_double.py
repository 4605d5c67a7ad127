"""A loopback stand-in for Replicate's HTTP API as TangoFlux uses it (issue 24), following its
documented contract.

Facts it honours:
- Routes and answers (replicate.com/docs "Create a prediction", "Predictions", HTTP reference):
  `POST /v1/predictions` with `{"version", "input", "webhook"?, "webhook_events_filter"?}` and
  `Authorization: Bearer <token>` (the older `Token <token>` too) answers 201 with the prediction at
  once: `id`, `status` "starting", `urls.get` / `urls.cancel` / `urls.web`, `input`, `output` null,
  `error` null, `logs`, `data_removed`, `created_at`, `metrics`. It then goes processing, then
  succeeded (or failed, with an `error` text, or canceled); `metrics.predict_time` is the seconds it
  ran. `GET /v1/predictions/{id}` answers it as it is now; an id it does not know answers 404.
  `Prefer: wait` (or `wait=n`, n 1 to 60; 60 by default) holds the create answer until the
  prediction ends or the wait runs out, then answers it as it is.
- The model (the plug-in's audio-worker/src/audio-clients/tango-flux.ts, 34648b7): version
  `fcdc4217...` of declare-lab/tangoflux; input `prompt`, `duration` 1-30 s, `steps` 1-200 (25 by
  default), `guidance_scale` 1-20 (4.5 by default); output: the URL of a WAV file (44.1 kHz stereo,
  here from the offline synthesiser), served by Replicate's file host without the API token.
- Data retention ("Data retention"): an API prediction's input, output, files and logs are removed
  an hour after it was made (RETENTION_S; settable): the prediction then answers with
  `data_removed: true` and no output, and its file URL answers 404. A prediction deleted by hand
  (`delete`) is gone entirely: its GET answers 404.
- Errors (problem details `title`, `detail`, `status`, as replicate-python's ReplicateError reads
  them): 401 "Unauthenticated" / "You did not pass a valid authentication token"; 402 "Insufficient
  credit"; 422 "Invalid version or not permitted" and "Input validation failed"; 429
  `{"detail": "Request was throttled. Your rate limit resets in ~30s."}` ("Rate limits"); 500.
- Webhooks ("Webhooks", "Verify webhooks"): a POST of the prediction (the body GET would answer) to
  the `webhook` URL for each event in `webhook_events_filter` (start, output, logs, completed; all
  when unset), signed the standard-webhooks way (`webhook-id`, `webhook-timestamp`,
  `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>` with the key after `whsec_`),
  retried a few times when the receiver fails, with the same webhook-id. `GET
  /v1/webhooks/default/secret` answers `{"key": "whsec_..."}`.

It counts the predictions it created (each one is paid for: Replicate bills the GPU seconds it ran),
so tests can assert exactly how many paid generations happened.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import requests
from werkzeug.wrappers import Request, Response

from devstack.doubles.synth import synthesize_wav
from devstack.events import CHANGES
from devstack.serving import serve_wsgi, stop_server

VERSION = "fcdc421786888a045329d7c4e1874764433a2516b21f4c34bd3da4e054d04cf9"
RETENTION_S = 3600.0
MAX_WAIT_S = 60
EVENTS = ("start", "output", "logs", "completed")
# (lowest, highest, default) per input, as the model's schema gives them.
INPUTS: dict[str, tuple[float, float, float]] = {
    "duration": (1, 30, 10),
    "steps": (1, 200, 25),
    "guidance_scale": (1, 20, 4.5),
}
WEBHOOK_ATTEMPTS = 3

ERRORS: dict[int, dict[str, Any]] = {
    401: {
        "title": "Unauthenticated",
        "detail": "You did not pass a valid authentication token",
        "status": 401,
    },
    402: {
        "title": "Insufficient credit",
        "detail": "You have insufficient credit to run this model. Go to "
        "https://replicate.com/account/billing#billing to purchase credit. Once you purchase credit, "
        "please wait a few minutes before trying again.",
        "status": 402,
    },
    404: {"title": "Not found", "detail": "Not found.", "status": 404},
    422: {
        "title": "Invalid version or not permitted",
        "detail": "The specified version does not exist (or perhaps you don't have permission to use it?)",
        "status": 422,
    },
    429: {"detail": "Request was throttled. Your rate limit resets in ~30s.", "status": 429},
    500: {"title": "Internal server error", "detail": "An unexpected error occurred.", "status": 500},
}


@dataclass
class Answer:
    """One scripted answer to the next API request (`on` narrows which)."""

    status: int
    on: Literal["create", "get", "any"] = "any"
    delay_s: float = 0.0  # before answering (a slow API)
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None  # ERRORS[status] when None
    passthrough: bool = False  # delay only, then answer as usual


@dataclass
class Outcome:
    """How the next prediction created ends."""

    status: Literal["succeeded", "failed", "canceled"] = "succeeded"
    error: str | None = None


@dataclass
class Delivery:
    """One webhook POST the double made."""

    url: str
    event: str
    headers: dict[str, str]
    body: bytes
    answered: int | None  # None: the receiver could not be reached


@dataclass
class Record:
    id: str
    input: dict[str, Any]
    made: float  # time.monotonic()
    outcome: Outcome
    webhook: str | None = None
    events: tuple[str, ...] = EVENTS
    status: str = "starting"
    error: str | None = None
    output: bytes | None = None
    started: float | None = None
    completed: float | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    ended: threading.Event = field(default_factory=threading.Event)
    outbox: queue.Queue[tuple[str, bytes] | None] = field(default_factory=queue.Queue)


class ReplicateDouble:
    def __init__(
        self,
        api_token: str,
        *,
        start_s: float = 0.05,
        generation_s: float = 0.2,
        retention_s: float = RETENTION_S,
        webhook_secret: str | None = None,
    ) -> None:
        self.api_token = api_token
        self.start_s = start_s  # "starting" (booting) before "processing"
        self.generation_s = generation_s  # "processing" before the outcome
        self.retention_s = retention_s
        self.webhook_secret = webhook_secret or "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.file_delay_s = 0.0  # before the output file's first byte
        self.predictions: dict[str, Record] = {}
        self.made: list[Record] = []  # every prediction created, deleted ones included (each billed)
        self.deliveries: list[Delivery] = []
        self.seen: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers of every request
        self._created = 0
        self._answers: deque[Answer] = deque()
        self._outcomes: deque[Outcome] = deque()
        self._lock = threading.Lock()
        self._server: Any = None
        self.root = ""
        self.url = ""

    # -- control ---------------------------------------------------------------------------------
    def script(self, *answers: Answer) -> None:
        with self._lock:
            self._answers.extend(answers)

    def outcomes(self, *outcomes: Outcome) -> None:
        with self._lock:
            self._outcomes.extend(outcomes)

    def delete(self, prediction_id: str) -> None:
        """A prediction removed by hand: gone entirely (its GET answers 404)."""
        with self._lock:
            self.predictions.pop(prediction_id, None)

    @property
    def predictions_created(self) -> int:
        """The paid figure: every prediction made is billed for the seconds it ran."""
        with self._lock:
            return self._created

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server, self.root = serve_wsgi(self, host, port, "replicate")
        self.url = f"{self.root}/v1"
        return self.url

    def stop(self) -> None:
        stop_server(self._server)
        self._server = None

    # -- WSGI ------------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        with self._lock:
            self.seen.append((request.method, request.path, dict(request.headers.items())))
        return self._route(request)(environ, start_response)

    def _route(self, request: Request) -> Response:
        path = request.path.rstrip("/")
        if path.startswith("/files/") and request.method == "GET":
            return self._file(path.split("/")[2])
        if not path.startswith("/v1/"):
            return _problem(404)
        kind: Literal["create", "get"] = "create" if request.method == "POST" else "get"
        scripted = self._next_answer(kind)
        if scripted is not None:
            time.sleep(scripted.delay_s)
            if not scripted.passthrough:
                return _problem(scripted.status, scripted.body, scripted.headers)
        if not self._authorized(request):
            return _problem(401)
        if path == "/v1/predictions" and request.method == "POST":
            return self._create(request)
        if path.startswith("/v1/predictions/") and request.method == "GET":
            return self._get(path.split("/")[3])
        if path == "/v1/webhooks/default/secret" and request.method == "GET":
            return _json({"key": self.webhook_secret})
        return _problem(404)

    def _next_answer(self, kind: str) -> Answer | None:
        with self._lock:
            if self._answers and self._answers[0].on in (kind, "any"):
                return self._answers.popleft()
        return None

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() in ("bearer", "token") and hmac.compare_digest(token, self.api_token)

    # -- predictions -----------------------------------------------------------------------------
    def _create(self, request: Request) -> Response:
        try:
            body = json.loads(request.get_data())
        except ValueError:
            return _problem(400, {"title": "Bad request", "detail": "The body is not JSON.", "status": 400})
        if not isinstance(body, dict) or body.get("version") != VERSION:
            return _problem(422)
        model_input, problems = _checked_input(body.get("input"))
        if problems:
            detail = "".join(f"- input.{name}: {text}\n" for name, text in problems)
            invalid = [{"field": f"input.{name}", "description": text} for name, text in problems]
            return _problem(
                422,
                {
                    "title": "Input validation failed",
                    "detail": detail,
                    "status": 422,
                    "invalid_fields": invalid,
                },
            )
        events = body.get("webhook_events_filter") or list(EVENTS)
        with self._lock:
            outcome = self._outcomes.popleft() if self._outcomes else Outcome()
            record = Record(
                id=uuid.uuid4().hex[:26],
                input=model_input,
                made=time.monotonic(),
                outcome=outcome,
                webhook=body.get("webhook") or None,
                events=tuple(e for e in events if e in EVENTS),
            )
            self.predictions[record.id] = record
            self.made.append(record)
            self._created += 1
        CHANGES.notify()  # only changes report: a wait whose check reads the double must not wake itself
        self._notify(record, "start")
        threading.Thread(target=self._run, args=(record,), daemon=True, name="replicate-run").start()
        if record.webhook is not None:
            threading.Thread(
                target=self._send_webhooks, args=(record,), daemon=True, name="replicate-webhook"
            ).start()
        wait = _wait_s(request.headers.get("prefer", ""))
        if wait:
            record.ended.wait(wait)
        return _json(self._view(record), 201)

    def _get(self, prediction_id: str) -> Response:
        with self._lock:
            record = self.predictions.get(prediction_id)
        if record is None:
            return _problem(404)
        return _json(self._view(record))

    def _file(self, prediction_id: str) -> Response:
        time.sleep(self.file_delay_s)
        with self._lock:
            record = self.predictions.get(prediction_id)
        if record is None or record.output is None or self._removed(record):
            return Response(b"Not Found", status=404, content_type="text/plain")
        return Response(record.output, status=200, content_type="audio/wav")

    def _run(self, record: Record) -> None:
        """starting -> processing -> the scripted outcome, as the clock says."""
        time.sleep(self.start_s)
        with self._lock:
            record.status, record.started = "processing", time.monotonic()
        CHANGES.notify()
        time.sleep(self.generation_s)
        outcome = record.outcome
        audio = synthesize_wav(record.input["prompt"], float(record.input["duration"]))
        with self._lock:
            if outcome.status == "succeeded":
                record.output = audio
            record.error = outcome.error if outcome.status == "failed" else None
            record.status, record.completed = outcome.status, time.monotonic()
        if outcome.status == "succeeded":
            self._notify(record, "output")
        record.ended.set()
        self._notify(record, "completed")
        CHANGES.notify()

    def _removed(self, record: Record) -> bool:
        return time.monotonic() - record.made >= self.retention_s

    def _view(self, record: Record) -> dict[str, Any]:
        """The prediction as GET (and the webhook) answers it."""
        with self._lock:
            removed = self._removed(record) and record.completed is not None
            get_url = f"{self.url}/predictions/{record.id}"
            ran = None
            if record.started is not None and record.completed is not None:
                ran = round(record.completed - record.started, 3)
            return {
                "id": record.id,
                "model": "declare-lab/tangoflux",
                "version": VERSION,
                "input": {} if removed else dict(record.input),
                "logs": "" if removed else f"generating {record.input['duration']} s\n",
                "output": None
                if removed or record.output is None
                else f"{self.root}/files/{record.id}/output.wav",
                "data_removed": removed,
                "error": record.error,
                "status": record.status,
                "created_at": record.created_at,
                "urls": {
                    "get": get_url,
                    "cancel": f"{get_url}/cancel",
                    "web": f"https://replicate.com/p/{record.id}",
                },
                "metrics": {"predict_time": ran} if ran is not None else {},
            }

    # -- webhooks --------------------------------------------------------------------------------
    def _notify(self, record: Record, event: str) -> None:
        """Queue the event for the prediction's webhook: deliveries go out one at a time, in order."""
        if record.webhook is None:
            return
        if event in record.events:
            record.outbox.put((event, json.dumps(self._view(record)).encode()))
        if event == "completed":
            record.outbox.put(None)

    def _send_webhooks(self, record: Record) -> None:
        while (item := record.outbox.get()) is not None:
            assert record.webhook is not None
            self._deliver(record.webhook, *item)

    def _deliver(self, url: str, event: str, body: bytes) -> None:
        webhook_id = f"msg_{secrets.token_hex(12)}"
        for attempt in range(WEBHOOK_ATTEMPTS):
            stamp = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": stamp,
                "webhook-signature": sign(self.webhook_secret, webhook_id, stamp, body),
            }
            try:
                answered: int | None = requests.post(url, data=body, headers=headers, timeout=5).status_code
            except requests.RequestException:
                answered = None
            with self._lock:
                self.deliveries.append(Delivery(url, event, headers, body, answered))
            CHANGES.notify()
            if answered is not None and 200 <= answered < 300:
                return
            time.sleep(0.1 * (attempt + 1))

    def deliveries_of(self, event: str) -> Iterator[Delivery]:
        with self._lock:
            found = [d for d in self.deliveries if d.event == event]
        return iter(found)


def sign(secret: str, webhook_id: str, stamp: str, body: bytes) -> str:
    """The webhook-signature value (standard-webhooks v1)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _checked_input(given: object) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    if not isinstance(given, dict):
        return {}, [("prompt", "is required")]
    problems: list[tuple[str, str]] = []
    if not isinstance(given.get("prompt"), str) or not given["prompt"].strip():
        problems.append(("prompt", "is required"))
    model_input: dict[str, Any] = {"prompt": given.get("prompt")}
    for name, (low, high, default) in INPUTS.items():
        value = given.get(name, default)
        integral = name != "guidance_scale"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integral and value != int(value))
        ):
            problems.append(
                (name, "Invalid type. Expected: integer" if integral else "Invalid type. Expected: number")
            )
        elif value < low:
            problems.append((name, f"Must be greater than or equal to {low:g}"))
        elif value > high:
            problems.append((name, f"Must be less than or equal to {high:g}"))
        model_input[name] = value
    return model_input, problems


def _wait_s(prefer: str) -> float | None:
    """`Prefer: wait` is 60 s; `wait=n` is n (1 to 60)."""
    for part in prefer.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return float(min(MAX_WAIT_S, max(1, int(value)))) if value else float(MAX_WAIT_S)
            except ValueError:
                return float(MAX_WAIT_S)
    return None


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _problem(
    status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> Response:
    content = body if body is not None else ERRORS.get(status, {"detail": f"HTTP {status}", "status": status})
    response = Response(json.dumps(content), status=status, content_type="application/problem+json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response
