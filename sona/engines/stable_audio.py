"""Stability AI's Stable Audio API (text-to-audio and audio-to-audio): the request contract and its
errors as typed kinds."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import platform
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

import requests
from pydantic import BaseModel, ConfigDict, SkipValidation
from requests.structures import CaseInsensitiveDict

from sona import __version__
from sona.audio.input_audio import InputAudio, input_object
from sona.config import Settings
from sona.deadline import SLACK_S, Deadline
from sona.errors import BadRequest, DeadlineExceeded, PermanentError, ServiceOutage, TransientError
from sona.job.messages import Said
from sona.job.modes import JobPlan, plan_job
from sona.models import GeneratedAudio, Job
from sona.retrying import provider_retrying

log = logging.getLogger(__name__)

USER_AGENT = f"sona-audio-function/{__version__} (python {platform.python_version()})"
AUDIO_TO_AUDIO = "audio-to-audio"
# The least strength each model takes (stable-audio-2.5 refuses less than 0.01).
MIN_STRENGTH = {"stable-audio-2.5": 0.01, "stable-audio-2": 0.0, "stable-audio-3": 0.0}
# Sent when the row names none: the API's own default (1) ignores the input altogether.
DEFAULT_STRENGTH = 0.5
# stable-audio-2.5 and stable-audio-3 take 4..8 steps; stable-audio-2 takes 30..100.
STEPS = {
    "stable-audio-2.5": {"low": 4, "medium": 6, "high": 8},
    "stable-audio-3": {"low": 4, "medium": 6, "high": 8},
    "stable-audio-2": {"low": 30, "medium": 50, "high": 100},
    # TangoFlux on Replicate: the plug-in's worker sent these (audio-clients/tango-flux.ts, 34648b7).
    "tangoflux": {"low": 25, "medium": 100, "high": 200},
}
_CHUNK = 256 * 1024


class GenerationRequest(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt: str
    duration: int
    model: str
    steps: int
    output_format: str = "wav"
    seed: int | None = None
    cfg_scale: float | None = None
    endpoint: Literal["text-to-audio", "audio-to-audio"] = "text-to-audio"
    # Audio-to-audio: the object in the inputs bucket, and the checked file once it has been read.
    input_object: str | None = None
    strength: float | None = None
    source: SkipValidation[InputAudio | None] = None  # not validated: that would copy up to 50 MB
    # stability-client-user-id: the job's owner, hashed, for the provider's abuse handling.
    client_user_id: str | None = None

    @classmethod
    def from_job(cls, job: Job, settings: Settings) -> GenerationRequest:
        """Check the row before paying for anything: bad input fails the job with a plain reason."""
        return cls.from_plan(plan_job(job, settings), job, settings)

    @classmethod
    def from_plan(cls, plan: JobPlan, job: Job, settings: Settings) -> GenerationRequest:
        """The request for what the row asks for (sona/job/modes.py decided it)."""
        request = cls(
            prompt=plan.prompt,
            duration=plan.duration,
            model=plan.model,
            steps=STEPS[plan.model][plan.quality],
            cfg_scale=settings.stable_audio_cfg_scale,
            client_user_id=client_user_id(job.user_id),
        )
        if plan.kind == AUDIO_TO_AUDIO:
            return request._audio_to_audio(job, settings)
        return request

    def _audio_to_audio(self, job: Job, settings: Settings) -> GenerationRequest:
        strength = DEFAULT_STRENGTH if job.strength is None else job.strength
        least = MIN_STRENGTH[self.model]
        if not least <= strength <= 1:
            raise BadRequest(f"The strength must be {least:g} to 1 with {self.model}, not {strength:g}.")
        name = input_object(job.input_path, job.user_id, settings.supabase_input_bucket)
        update = {"endpoint": AUDIO_TO_AUDIO, "input_object": name, "strength": strength}
        return self.model_copy(update=update)

    def form_fields(self) -> dict[str, tuple[str | None, Any] | tuple[str, bytes, str]]:
        """multipart/form-data parts (the API refuses a url-encoded body even with no file)."""
        fields: dict[str, Any] = {
            "prompt": self.prompt,
            "duration": self.duration,  # always sent: the API's default is 190 s
            "model": self.model,  # always sent: the API's default is stable-audio-2
            "steps": self.steps,
            "output_format": self.output_format,
            "seed": self.seed,
            "cfg_scale": self.cfg_scale,
            "strength": self.strength,  # audio-to-audio: always sent, the API's default (1) ignores the input
        }
        parts: dict[str, tuple[str | None, Any] | tuple[str, bytes, str]] = {
            k: (None, str(v)) for k, v in fields.items() if v is not None
        }
        if self.source is not None:
            parts["audio"] = (self.source.filename, self.source.data, self.source.content_type)
        return parts

    def headers(self) -> dict[str, str]:
        return {"stability-client-user-id": self.client_user_id} if self.client_user_id else {}


def client_user_id(user_id: object) -> str | None:
    """The end user as the provider sees them: a hash, so the provider never learns our user ids."""
    if user_id is None:
        return None
    return hashlib.sha256(f"sona-user:{user_id}".encode()).hexdigest()


# What each documented error status means for the job (the provider's own words go to `detail`).
_PERMANENT = {
    400: "The audio service rejected the request",
    403: "The prompt was flagged by the audio service's content moderation; please rephrase it",
    404: "The audio service address is misconfigured; the team has been alerted",
    413: "The request was too large for the audio service",
    422: "The audio service could not accept the prompt; prompts must be in English",
}
# The refusals a musician acts on in their own way (sona/job/messages.py); the rest could not generate.
_SAYS: dict[int, Said] = {403: "moderation", 422: "english_only"}


_EDGE_REFUSED = (
    "The audio service refused the request; this is not a problem with your prompt. The job will be retried."
)
_UNAVAILABLE = (
    "The audio service is unavailable right now; this is not a problem with your prompt. "
    "Your job will run when the service is back."
)
# Answers that say the account or our configuration is at fault, never the job: the service pauses.
# The stable code names the cause for operators (log-based metric, alert, stats).
_ACCOUNT_LEVEL = {401: "provider_unauthorized", 402: "provider_out_of_credits"}
# Stability locks an account out for 60 s after 150 requests in 10 s (no Retry-After documented).
LOCKOUT_S = 60.0
# A 429 asking for a wait this short is a throttle, retried in place within the attempt.
THROTTLE_S = 10.0


def classify(status: int, body: bytes | bytearray, headers: CaseInsensitiveDict[str]) -> Exception:
    """An HTTP error answer becomes a PermanentError or a TransientError (by status, not by text)."""
    name, errors = _error_body(body)
    detail = f"HTTP {status} {name or ''} {'; '.join(errors)}".strip()
    if status in _ACCOUNT_LEVEL:
        return ServiceOutage(_UNAVAILABLE, code=_ACCOUNT_LEVEL[status], detail=detail)
    wait_s = _retry_after(headers)
    if status == 429 and name == "rate_limit_exceeded" and (wait_s is None or wait_s > THROTTLE_S):
        # The documented lockout (no Retry-After, or a long one): every request from the account
        # is refused for a while, whichever instance sends it, so the service pauses.
        return ServiceOutage(
            _UNAVAILABLE, code="provider_locked_out", detail=detail, retry_after_s=wait_s or LOCKOUT_S
        )
    if status == 429:
        return TransientError("The audio service is busy (rate limited)", detail=detail, retry_after_s=wait_s)
    if status == 403 and name != "content_moderation":
        # The provider's edge (an HTML page, or any other 403) refusing us: the account or the
        # network is at fault, not the prompt.
        return ServiceOutage(_EDGE_REFUSED, code="provider_edge_refused", detail=detail)
    if status >= 500:
        return TransientError(
            "The audio service had a temporary problem",
            detail=detail,
            retry_after_s=_retry_after(headers),
        )
    message = _PERMANENT.get(status, f"The audio service refused the request (HTTP {status})")
    return PermanentError(message, detail=detail, says=_SAYS.get(status))


def _error_body(body: bytes | bytearray) -> tuple[str | None, list[str]]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, []  # a CDN's HTML page: the status alone decides
    if not isinstance(data, dict):
        return None, []
    errors = data.get("errors")
    return data.get("name"), [str(e) for e in errors] if isinstance(errors, list) else []


def _retry_after(headers: CaseInsensitiveDict[str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class StableAudioClient:
    def __init__(
        self,
        settings: Settings,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._base_url = settings.stable_audio_api_url
        self._session = session or requests.Session()
        self.calls = 0

    def generate(self, request: GenerationRequest, deadline: Deadline) -> GeneratedAudio:
        """One paid generation, retrying transient failures with backoff inside the deadline."""
        policy = provider_retrying("provider call", self._settings, deadline, self._sleep)
        return policy(self._call_once, request, deadline)

    def _call_once(self, request: GenerationRequest, deadline: Deadline) -> GeneratedAudio:
        left = deadline.check("generate", need_s=0.5)
        key = self._settings.stable_audio_api_key.get_secret_value()
        headers = {
            "authorization": f"Bearer {key}",
            "accept": self._settings.stable_audio_accept,
            "user-agent": USER_AGENT,
            **request.headers(),
        }
        if request.endpoint == AUDIO_TO_AUDIO and request.source is None:
            raise PermanentError("The input audio was not read", detail="audio-to-audio without a source")
        self.calls += 1
        try:
            # Each read may wait what is left; the whole answer is cut off at the deadline.
            response = self._session.post(
                f"{self._base_url}/{request.endpoint}",
                headers=headers,
                files=request.form_fields(),
                timeout=(min(10.0, left), left),
                stream=True,
            )
            with response, deadline.cuts(_socket_of(response)):
                body = _read_within(response, deadline)
        except requests.RequestException as exc:
            raise _unanswered(exc, deadline) from None
        if response.status_code != 200:
            raise classify(response.status_code, body, response.headers)
        return _generated(response, body, request.model)


def _socket_of(response: requests.Response) -> socket.socket | None:
    """The connection's socket while the body is unread (urllib3 2's HTTPResponse.connection)."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _unanswered(exc: requests.RequestException, deadline: Deadline) -> TransientError:
    if deadline.remaining() <= SLACK_S:
        return DeadlineExceeded("The audio service did not answer in time", detail=type(exc).__name__)
    if isinstance(exc, requests.Timeout):
        return TransientError("The audio service did not answer in time", detail="timeout")
    return TransientError("Could not reach the audio service", detail=type(exc).__name__)


def _read_within(response: requests.Response, deadline: Deadline) -> bytearray:
    """The body in one buffer sized from Content-Length (joining chunks would hold it twice)."""
    length = int(response.headers.get("content-length") or 0)
    body = bytearray(length) if length else bytearray()
    filled = 0
    for chunk in response.iter_content(_CHUNK):
        if length and filled + len(chunk) <= length:
            body[filled : filled + len(chunk)] = chunk
        else:
            body[filled:] = chunk
        filled += len(chunk)
        deadline.check("generate: reading audio")
    del body[filled:]  # a body that stops short is caught by urllib3 (IncompleteRead) before this
    return body


def _generated(response: requests.Response, body: bytes | bytearray, model: str) -> GeneratedAudio:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    finish_reason = response.headers.get("finish-reason")
    seed = response.headers.get("seed")
    if content_type == "application/json":
        try:
            data = json.loads(body)
            body = base64.b64decode(data["audio"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise PermanentError(
                "The audio service returned audio that could not be read", detail="bad JSON audio"
            ) from None
        finish_reason = data.get("finish_reason", finish_reason)
        seed = data.get("seed", seed)
        content_type = "audio/wav" if body[:4] == b"RIFF" else "audio/mpeg"
    if finish_reason == "CONTENT_FILTERED":
        raise PermanentError(_PERMANENT[403], detail="finish_reason CONTENT_FILTERED", says="moderation")
    return GeneratedAudio(
        data=body,
        content_type=content_type,
        model=model,
        seed=int(seed) if seed not in (None, "") else None,
        finish_reason=finish_reason,
    )
