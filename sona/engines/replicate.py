"""TangoFlux on Replicate's HTTP API: the designer engine the plug-in's own worker used (issue 24).

Facts this module follows:
- The model and its input, from the plug-in's audio-worker/src/audio-clients/tango-flux.ts (34648b7):
  `declare-lab/tangoflux` at version VERSION; input `prompt`, `duration` (1-30 s), `steps` from the
  quality (low 25, medium 100, high 200, medium when unset; its header comment says 15/25/50, its
  code sends 25/100/200), `guidance_scale` 3.5; the output is the URL of a WAV file.
- Replicate's HTTP API (replicate.com/docs, "Create a prediction", "Predictions", "Data retention",
  "Rate limits", "Verify webhooks"): `POST /v1/predictions` with `{"version", "input"}` and a bearer
  token answers 201 with the prediction at once (`id`, `status`, `urls.get`, `output`, `error`,
  `data_removed`, `metrics.predict_time`); `GET /v1/predictions/{id}` polls it; statuses are starting,
  processing, succeeded, failed, canceled (and aborted, for one its Cancel-After deadline stopped before it
  ran). `Prefer: wait` (or `wait=n`, n up to 60) holds the create answer until the prediction ends
  or the wait runs out, then answers it as it is. Inputs, outputs and files of API predictions are
  deleted after an hour (`data_removed` turns true, the file URL stops answering). Errors are
  problem details (`title`, `detail`, `status`, as replicate-python's ReplicateError reads them); a
  429 says `{"detail": "Request was throttled. ..."}`.
- Webhooks are signed the standard-webhooks way: HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.
  {raw body}` with the base64 key after `whsec_`, sent as space-separated `v1,<base64>` entries in
  `webhook-signature`; a receiver refuses timestamps far from its clock (replay).

The paid step is `create`; `get` and `download` are free and may be repeated within the hour. So a
create is retried in place only on answers saying nothing was made (429, 5xx); a create whose answer
was lost in transit is not repeated here (it may have made a prediction: that is the caller's call).
Billing is by the GPU seconds the prediction ran (`predict_time`), not per call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from requests.structures import CaseInsensitiveDict
from tenacity import Retrying
from urllib3.exceptions import NewConnectionError

from sona.config import ConfigError, Settings
from sona.deadline import SLACK_S, Deadline
from sona.engines.stable_audio import STEPS as STABLE_AUDIO_STEPS
from sona.engines.stable_audio import USER_AGENT
from sona.errors import (
    DeadlineExceeded,
    GenerationGone,
    PermanentError,
    ServiceOutage,
    SonaError,
    TransientError,
)
from sona.models import GeneratedAudio
from sona.retrying import provider_retrying

log = logging.getLogger(__name__)

MODEL_NAME = "tangoflux"  # the name an engine setting would use
REPLICATE_MODEL = "declare-lab/tangoflux"
VERSION = "fcdc421786888a045329d7c4e1874764433a2516b21f4c34bd3da4e054d04cf9"
STEPS = STABLE_AUDIO_STEPS[MODEL_NAME]  # one table of steps per model, in sona/engines/stable_audio.py
GUIDANCE_SCALE = 3.5
MIN_DURATION_S, MAX_DURATION_S = 1, 30
# API predictions lose their input, output and files after this long.
RETENTION_S = 3600
# The longest `Prefer: wait` Replicate honours.
MAX_WAIT_S = 60
# How far a webhook's timestamp may be from our clock (the standard-webhooks libraries' default).
WEBHOOK_TOLERANCE_S = 300
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")

Status = Literal["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
RUNNING: frozenset[str] = frozenset({"starting", "processing"})
_CHUNK = 256 * 1024


class PredictionGone(GenerationGone):
    """Replicate no longer has what a prediction made: its id is unknown (404), or the hour passed
    and its output was deleted. The only case in which a job that paid once may create again."""


class WebhookRefused(Exception):
    """A request at the webhook door that is not Replicate's, or not now: answer 401, enqueue nothing.
    `reason` is safe to log (no secret, no body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TangoFluxInput(BaseModel):
    """The model's input, checked before anything is paid for."""

    model_config = ConfigDict(frozen=True)

    prompt: str = Field(min_length=1)
    duration: int = Field(ge=MIN_DURATION_S, le=MAX_DURATION_S)
    steps: int = Field(ge=1, le=200)
    guidance_scale: float = Field(default=GUIDANCE_SCALE, ge=1, le=20)

    @classmethod
    def for_quality(cls, prompt: str, duration: int, quality: str | None) -> TangoFluxInput:
        """What the plug-in's worker sent for a row's prompt, length and quality (medium when the
        quality is unset or a name it did not know)."""
        steps = STEPS.get(quality or "medium", STEPS["medium"])
        return cls.build(prompt=prompt, duration=duration, steps=steps)

    @classmethod
    def build(cls, **fields: Any) -> TangoFluxInput:
        try:
            return cls(**fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            message = f"The sound effect engine cannot make this request ({problems})"
            raise PermanentError(message, detail="TangoFlux input out of range") from None


@dataclass(frozen=True)
class Prediction:
    """What Replicate says about one prediction."""

    id: str
    status: str
    output_url: str | None = None
    error: str | None = None
    data_removed: bool = False
    predict_time_s: float | None = None  # the GPU seconds it ran: what it is billed by

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    @classmethod
    def from_json(cls, data: object) -> Prediction:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or "status" not in data:
            raise TransientError("The audio service answered something unreadable", detail="not a prediction")
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        predict_time = metrics.get("predict_time") if metrics else None
        error = data.get("error")
        return cls(
            id=data["id"],
            status=str(data["status"]),
            output_url=_output_url(data.get("output")),
            error=str(error) if error else None,
            data_removed=bool(data.get("data_removed")),
            predict_time_s=float(predict_time) if isinstance(predict_time, int | float) else None,
        )


def _output_url(output: object) -> str | None:
    """TangoFlux's output is one URL; a list holding one is read the same (older cog outputs), and
    a data: URL (a file answered inline) is kept for download to decode."""
    if isinstance(output, list) and len(output) == 1:
        output = output[0]
    schemes = ("http://", "https://", "data:")
    return output if isinstance(output, str) and output.startswith(schemes) else None


# -- what each answer means for the job ------------------------------------------------------------

_UNAVAILABLE = (
    "The audio service is unavailable right now; this is not a problem with your prompt. "
    "Your job will run when the service is back."
)
# The account or our configuration is at fault, never the job: the service pauses (same codes as
# Stable Audio's, so the same alerts fire).
_ACCOUNT_LEVEL = {401: "provider_unauthorized", 402: "provider_out_of_credits", 403: "provider_edge_refused"}
_PERMANENT = {
    400: "The sound effect engine rejected the request",
    404: "The audio service address is misconfigured; the team has been alerted",
    413: "The request was too large for the audio service",
    422: "The sound effect engine could not accept the request",
}


def classify(status: int, body: bytes | bytearray, headers: CaseInsensitiveDict[str]) -> Exception:
    """An HTTP error answer from the API becomes one of the project's kinds (by status, not text)."""
    title, detail = _problem(body)
    said = ": ".join(part for part in (f"HTTP {status} {title or ''}".strip(), detail) if part)
    if status in _ACCOUNT_LEVEL:
        return ServiceOutage(_UNAVAILABLE, code=_ACCOUNT_LEVEL[status], detail=said)
    if status == 429:
        return TransientError(
            "The audio service is busy (rate limited)", detail=said, retry_after_s=_retry_after(headers)
        )
    if status >= 500:
        return TransientError(
            "The audio service had a temporary problem", detail=said, retry_after_s=_retry_after(headers)
        )
    message = _PERMANENT.get(status, f"The audio service refused the request (HTTP {status})")
    if status in (400, 422) and detail:
        # For the operator's record: the musician reads sona/job/messages.py, never this.
        message = f"{message}: {readable(detail)}"
    return PermanentError(message, detail=said)


def _problem(body: bytes | bytearray) -> tuple[str | None, str | None]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None  # an HTML page from an edge: the status alone decides
    if not isinstance(data, dict):
        return None, None
    title, detail = data.get("title"), data.get("detail")
    return (str(title) if title else None), (str(detail) if detail else None)


def _retry_after(headers: CaseInsensitiveDict[str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


_URL = re.compile(r"https?://\S+")
_SPACE = re.compile(r"\s+")


def readable(text: str, limit: int = 200) -> str:
    """A provider's error text as a musician may read it: its last non-empty line (a traceback ends
    with the error itself), links and control characters out, one line, at most `limit` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    line = _URL.sub("[link]", _SPACE.sub(" ", line))
    line = "".join(c for c in line if c.isprintable()).strip(" -")
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def settle(prediction: Prediction) -> str | None:
    """The output URL of a finished prediction; None while it runs. A failed, canceled or aborted
    one is a PermanentError; one whose output was deleted is PredictionGone."""
    if prediction.running:
        return None
    if prediction.status == "succeeded":
        if prediction.data_removed:
            raise PredictionGone(
                "The generated sound expired before it was stored", detail=f"{prediction.id}: data removed"
            )
        if prediction.output_url is None:
            raise PermanentError("The audio service returned no audio", detail=f"{prediction.id}: no output")
        return prediction.output_url
    if prediction.status == "failed":
        reason = readable(prediction.error or "")
        message = "The sound effect engine could not generate this sound"
        raise PermanentError(f"{message}: {reason}" if reason else message, detail=f"{prediction.id}: failed")
    if prediction.status in ("canceled", "aborted"):
        raise PermanentError(
            "The generation was canceled by the audio service", detail=f"{prediction.id}: {prediction.status}"
        )
    raise PermanentError(
        "The audio service answered a status it does not document",
        detail=f"{prediction.id}: {prediction.status}",
    )


# -- webhooks ----------------------------------------------------------------------------------------


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: float = WEBHOOK_TOLERANCE_S,
) -> str:
    """The delivery's webhook-id when Replicate signed exactly this body within the tolerance;
    WebhookRefused otherwise. No I/O: the raw body, the request's headers and the secret decide."""
    lower = {k.lower(): v for k, v in headers.items()}
    webhook_id, stamp, signatures = (lower.get(f"webhook-{n}") for n in ("id", "timestamp", "signature"))
    if not webhook_id or not stamp or not signatures:
        raise WebhookRefused("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent_at = int(stamp)
    except ValueError:
        raise WebhookRefused("webhook-timestamp is not whole seconds") from None
    clock = time.time() if now is None else now
    if abs(clock - sent_at) > tolerance_s:
        raise WebhookRefused(f"webhook-timestamp is {clock - sent_at:.0f} s from our clock")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (ValueError, binascii.Error):
        raise WebhookRefused("the webhook secret is not a whsec_ key") from None
    signed = f"{webhook_id}.{stamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for entry in signatures.split():
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return webhook_id
    raise WebhookRefused("no signature matches the body")


# -- the client --------------------------------------------------------------------------------------


class ReplicateClient:
    """Create, get and download TangoFlux predictions, each call ended by the job's deadline."""

    def __init__(
        self,
        settings: Settings,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if settings.replicate_api_token is None:
            raise ConfigError(["REPLICATE_API_TOKEN is required to generate with TangoFlux on Replicate"])
        self._settings = settings
        self._token = settings.replicate_api_token
        self._base_url = settings.replicate_api_url
        self._session = session or requests.Session()
        self._sleep = sleep
        self.created = 0  # POSTs that made a prediction (each one is paid for)

    # The paid call.
    def create(
        self,
        tango: TangoFluxInput,
        deadline: Deadline,
        *,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] = ("completed",),
        wait_s: int | None = None,
    ) -> Prediction:
        """One prediction. `wait_s` asks Replicate to hold the answer until it ends (at most 60 s
        and what the deadline leaves): the id then arrives only at the end, so a caller that must
        keep the id before waiting leaves it unset."""
        body: dict[str, Any] = {"version": VERSION, "input": tango.model_dump()}
        if webhook_url:
            body["webhook"] = webhook_url
            body["webhook_events_filter"] = list(webhook_events)
        try:
            prediction = self._retrying("replicate create", deadline)(
                self._create_or_stop, body, wait_s, deadline
            )
        except _Stop as stop:
            raise stop.error from None
        self.created += 1
        log.info("TangoFlux prediction %s created (%s)", prediction.id, prediction.status)
        return prediction

    def get(self, prediction_id: str, deadline: Deadline) -> Prediction:
        """The prediction as it is now; PredictionGone when Replicate does not know the id."""
        return self._retrying("replicate get", deadline)(self._get_once, prediction_id, deadline)

    def download(self, output_url: str, deadline: Deadline) -> bytes:
        """The output file's bytes (no token is sent: the file host is not the API);
        PredictionGone when the hour has passed and the file is deleted."""
        if output_url.startswith("data:"):
            return _data_url(output_url)
        return self._retrying("replicate download", deadline)(self._download_once, output_url, deadline)

    def result(self, prediction_id: str, deadline: Deadline) -> GeneratedAudio | None:
        """The finished audio of a prediction, or None while it is still being made."""
        url = settle(self.get(prediction_id, deadline))
        if url is None:
            return None
        return GeneratedAudio(data=self.download(url, deadline), content_type="audio/wav", model=MODEL_NAME)

    # -- one HTTP exchange each ---------------------------------------------------------------------

    def _retrying(self, what: str, deadline: Deadline) -> Retrying:
        return provider_retrying(what, self._settings, deadline, self._sleep)

    def _api_headers(self) -> dict[str, str]:
        return {
            "authorization": f"Bearer {self._token.get_secret_value()}",
            "user-agent": USER_AGENT,
            "accept": "application/json",
        }

    def _create_or_stop(self, body: dict[str, Any], wait_s: int | None, deadline: Deadline) -> Prediction:
        try:
            return self._create_once(body, wait_s, deadline)
        except CreateUnanswered as exc:
            raise _Stop(exc) from None  # not a kind the retry policy repeats

    def _create_once(self, body: dict[str, Any], wait_s: int | None, deadline: Deadline) -> Prediction:
        left = deadline.check("replicate create", need_s=0.5)
        headers = {**self._api_headers(), "content-type": "application/json"}
        wait = min(wait_s or 0, MAX_WAIT_S, int(left - 1))
        if wait >= 1:
            headers["prefer"] = f"wait={wait}"
        status, payload, answer_headers = self._exchange(
            "POST",
            f"{self._base_url}/predictions",
            headers,
            json.dumps(body).encode(),
            deadline,
            sent_pays=True,
        )
        if status not in (200, 201):
            raise classify(status, payload, answer_headers)
        try:
            return Prediction.from_json(_json(payload))
        except TransientError as exc:
            # Accepted, so made and billed, but its id unreadable: never sent again in place.
            raise CreateUnanswered(
                "The audio service answered something unreadable", detail=exc.detail
            ) from None

    def _get_once(self, prediction_id: str, deadline: Deadline) -> Prediction:
        deadline.check("replicate get", need_s=0.2)
        url = f"{self._base_url}/predictions/{prediction_id}"
        status, payload, headers = self._exchange("GET", url, self._api_headers(), None, deadline)
        if status == 404:
            raise PredictionGone(
                "The generated sound is no longer available", detail=f"{prediction_id}: HTTP 404"
            )
        if status != 200:
            raise classify(status, payload, headers)
        return Prediction.from_json(_json(payload))

    def _download_once(self, output_url: str, deadline: Deadline) -> bytes:
        deadline.check("replicate download", need_s=0.2)
        headers = {"user-agent": USER_AGENT}
        status, payload, answer_headers = self._exchange("GET", output_url, headers, None, deadline)
        if status in (404, 410):
            raise PredictionGone("The generated sound expired before it was stored", detail=f"HTTP {status}")
        if status != 200:
            raise classify(status, payload, answer_headers)
        if not payload:
            raise TransientError("The generated sound arrived empty", detail="empty output file")
        return bytes(payload)

    def _exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: bytes | None,
        deadline: Deadline,
        *,
        sent_pays: bool = False,
    ) -> tuple[int, bytearray, CaseInsensitiveDict[str]]:
        left = deadline.remaining()
        try:
            # Each read may wait what is left; the whole answer is cut off at the deadline.
            response = self._session.request(
                method, url, headers=headers, data=data, timeout=(min(10.0, left), left), stream=True
            )
            with response, deadline.cuts(_socket_of(response)):
                body = _read_within(response, deadline, method)
        except requests.RequestException as exc:
            raise _unanswered(exc, deadline, sent_pays) from None
        return response.status_code, body, response.headers


class CreateUnanswered(TransientError):
    """A create whose answer never arrived (or arrived unreadable): Replicate may have made (and
    billed) a prediction whose id we do not know, so it is not sent again within this call. A
    DeadlineExceeded from create leaves the same doubt when the request had been sent."""


class _Stop(Exception):
    def __init__(self, error: SonaError) -> None:
        super().__init__(str(error))
        self.error = error


def _unanswered(exc: requests.RequestException, deadline: Deadline, sent_pays: bool) -> TransientError:
    if deadline.remaining() <= SLACK_S:
        return DeadlineExceeded("The audio service did not answer in time", detail=type(exc).__name__)
    never_sent = isinstance(exc, requests.ConnectTimeout) or _refused(exc)
    if sent_pays and not never_sent:
        return CreateUnanswered(
            "The audio service did not answer", detail=f"create unanswered: {type(exc).__name__}"
        )
    if isinstance(exc, requests.Timeout):
        return TransientError("The audio service did not answer in time", detail="timeout")
    return TransientError("Could not reach the audio service", detail=type(exc).__name__)


def _refused(exc: requests.RequestException) -> bool:
    """The connection was never made (refused, no route): nothing reached Replicate."""
    inner = exc.args[0] if exc.args else None
    return isinstance(inner, NewConnectionError) or isinstance(
        getattr(inner, "reason", None), NewConnectionError
    )


def _socket_of(response: requests.Response) -> socket.socket | None:
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _read_within(response: requests.Response, deadline: Deadline, step: str) -> bytearray:
    body = bytearray()
    for chunk in response.iter_content(_CHUNK):
        body += chunk
        deadline.check(f"replicate {step}: reading the answer")
    return body


def _data_url(url: str) -> bytes:
    """The bytes of a base64 data: URL."""
    meta, _, data = url.partition(",")
    try:
        if not meta.endswith(";base64") or not data:
            raise ValueError("not a base64 data URL")
        return base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        raise PermanentError(
            "The audio service returned audio that could not be read", detail="bad data URL"
        ) from None


def _json(payload: bytes | bytearray) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise TransientError("The audio service answered something unreadable", detail="not JSON") from None


# -- the engine shape the pipeline's seam takes (sa3's EngineById) -------------------------------------


class TangoFluxRequest(Protocol):
    """What a generation request carries that TangoFlux needs (sona.engines.stable_audio.GenerationRequest
    has these once its STEPS knows MODEL_NAME)."""

    @property
    def prompt(self) -> str: ...
    @property
    def duration(self) -> int: ...
    @property
    def steps(self) -> int: ...


class TangoFluxEngine:
    """submit pays once and answers the prediction id at once (before any wait); fetch answers the
    audio, None while it is being made, PredictionGone when Replicate no longer has it."""

    def __init__(self, client: ReplicateClient, poll_interval_s: float = 1.0) -> None:
        self.client = client
        self._poll_interval_s = poll_interval_s

    @property
    def poll_interval_s(self) -> float:
        return self._poll_interval_s

    def submit(self, request: TangoFluxRequest, deadline: Deadline) -> str:
        tango = TangoFluxInput.build(prompt=request.prompt, duration=request.duration, steps=request.steps)
        return self.client.create(tango, deadline).id

    def fetch(self, generation_id: str, model: str, deadline: Deadline) -> GeneratedAudio | None:
        return self.client.result(generation_id, deadline)
