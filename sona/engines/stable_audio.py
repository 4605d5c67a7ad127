"""Stability AI's Stable Audio API (text-to-audio and audio-to-audio): the request's wire encoding,
the client, and its errors as typed kinds. Stable Audio 3 (sona/engines/stable_audio_3.py) speaks
the same fields and error bodies."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.structures import CaseInsensitiveDict

from sona.config import Settings
from sona.deadline import Deadline
from sona.engines.base import AUDIO_TO_AUDIO, GenerationRequest
from sona.engines.http import USER_AGENT, ProviderClient, read_within, retry_after, socket_of, unanswered
from sona.errors import PermanentError, Said, ServiceOutage, TransientError
from sona.models import GeneratedAudio

log = logging.getLogger(__name__)


def form_fields(request: GenerationRequest) -> dict[str, tuple[str | None, Any] | tuple[str, bytes, str]]:
    """multipart/form-data parts (the API refuses a url-encoded body even with no file)."""
    fields: dict[str, Any] = {
        "prompt": request.prompt,
        "duration": request.duration,  # always sent: the API's default is 190 s
        "model": request.model,  # always sent: the API's default is stable-audio-2
        "steps": request.steps,
        "output_format": "wav",
        "seed": request.seed,
        "cfg_scale": request.cfg_scale,
        "strength": request.strength,  # audio-to-audio: always sent, the API's default (1) ignores the input
    }
    parts: dict[str, tuple[str | None, Any] | tuple[str, bytes, str]] = {
        k: (None, str(v)) for k, v in fields.items() if v is not None
    }
    if request.source is not None:
        parts["audio"] = (request.source.filename, request.source.data, request.source.content_type)
    return parts


def request_headers(request: GenerationRequest) -> dict[str, str]:
    """The end user, hashed, as Stability's abuse handling asks for it."""
    return {"stability-client-user-id": request.client_user_id} if request.client_user_id else {}


# What each documented error status means for the job (the provider's own words go to `detail`).
_PERMANENT = {
    400: "The audio service rejected the request",
    403: "The prompt was flagged by the audio service's content moderation; please rephrase it",
    404: "The audio service address is misconfigured; the team has been alerted",
    413: "The request was too large for the audio service",
    422: "The audio service could not accept the prompt; prompts must be in English",
}
# The refusals a musician acts on in their own way (sona/messages.py); the rest could not generate.
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
    name, errors = error_body(body)
    detail = f"HTTP {status} {name or ''} {'; '.join(errors)}".strip()
    if status in _ACCOUNT_LEVEL:
        return ServiceOutage(_UNAVAILABLE, code=_ACCOUNT_LEVEL[status], detail=detail)
    wait_s = retry_after(headers)
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
            retry_after_s=retry_after(headers),
        )
    message = _PERMANENT.get(status, f"The audio service refused the request (HTTP {status})")
    return PermanentError(message, detail=detail, says=_SAYS.get(status))


def error_body(body: bytes | bytearray) -> tuple[str | None, list[str]]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, []  # a CDN's HTML page: the status alone decides
    if not isinstance(data, dict):
        return None, []
    errors = data.get("errors")
    return data.get("name"), [str(e) for e in errors] if isinstance(errors, list) else []


class StableAudioClient(ProviderClient):
    def __init__(
        self,
        settings: Settings,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(settings, settings.stable_audio_api_url, session, sleep)

    def generate(self, request: GenerationRequest, deadline: Deadline) -> GeneratedAudio:
        """One paid generation, retrying transient failures with backoff inside the deadline."""
        return self._retrying("provider call", deadline)(self._call_once, request, deadline)

    def _call_once(self, request: GenerationRequest, deadline: Deadline) -> GeneratedAudio:
        left = deadline.check("generate", need_s=0.5)
        key = self._settings.stable_audio_api_key.get_secret_value()
        headers = {
            "authorization": f"Bearer {key}",
            "accept": self._settings.stable_audio_accept,
            "user-agent": USER_AGENT,
            **request_headers(request),
        }
        if request.kind == AUDIO_TO_AUDIO and request.source is None:
            raise PermanentError("The input audio was not read", detail="audio-to-audio without a source")
        try:
            # Each read may wait what is left; the whole answer is cut off at the deadline.
            response = self._session.post(
                f"{self._base_url}/{request.kind}",
                headers=headers,
                files=form_fields(request),
                timeout=(min(10.0, left), left),
                stream=True,
            )
            with response, deadline.cuts(socket_of(response)):
                body = read_within(response, deadline, "generate")
        except requests.RequestException as exc:
            raise unanswered(exc, deadline) from None
        if response.status_code != 200:
            raise classify(response.status_code, body, response.headers)
        return generated_audio(response, body, request.model)





def generated_audio(response: requests.Response, body: bytes | bytearray, model: str) -> GeneratedAudio:
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
