"""Stability AI's Stable Audio 3: asynchronous generations (DESIGN.md, Stable Audio 3; issue 22).

`POST {base}/stable-audio/{text-to-audio|audio-to-audio}` (multipart, the same fields as 2.5 with
`model=stable-audio-3`) answers 202 `{"id": <64 hex>}` once the generation is accepted, which is
when it is paid for. `GET {base}/results/{id}` answers 202 `{"status": "in-progress"}` while it
runs, then 200 with the audio (bytes for `accept: audio/*`, base64 JSON for `application/json`),
and 404 `generation_not_found` once the id is unknown or expired. Errors carry the 2.5 body
`{id, name, errors[]}` and map onto the same kinds; a key without Stable Audio 3 access (status and
body undocumented: any 401 or non-moderation 403) pauses the service and names the model setting.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import requests
from requests.structures import CaseInsensitiveDict

from sona.config import Settings
from sona.deadline import Deadline
from sona.engines.stable_audio import (
    AUDIO_TO_AUDIO,
    USER_AGENT,
    GenerationRequest,
    _error_body,
    _generated,
    _read_within,
    _socket_of,
    _unanswered,
    classify,
)
from sona.errors import GenerationGone, PermanentError, ServiceOutage
from sona.models import GeneratedAudio
from sona.retrying import provider_retrying

MODEL = "stable-audio-3"
_ID = re.compile(r"^[0-9a-fA-F]{16,128}$")  # the spec shows 64 hex digits; accept a little more
NOT_FOUND = "generation_not_found"
_MODEL_ACCESS = (
    "The audio service refused this account for the model in use; this is not a problem with your "
    "prompt. Your job will run when the service is back."
)


# The settings that may choose a model (sona/job/modes.py MODES names one per mode).
MODEL_SETTINGS = (
    "designer_model",
    "producer_model",
    "creator_model",
    "stable_audio_model",
    "designer_fallback_model",
    "producer_fallback_model",
    "creator_fallback_model",
)


def access_refused(
    status: int, body: bytes | bytearray, headers: CaseInsensitiveDict[str], settings: Settings
) -> Exception:
    """401 (unauthorized) and a 403 that is not moderation may be the per-account access flag of
    Stable Audio 3 (its answer is not documented): the account, not the job, is at fault; the pause's
    reason names the settings that chose the model, so an operator can switch them back."""
    error = classify(status, body, headers)
    if isinstance(error, ServiceOutage) and status in (401, 403):
        chosen = [name.upper() for name in MODEL_SETTINGS if getattr(settings, name) == MODEL]
        hint = f"{', '.join(chosen) or 'the model setting'}={MODEL}: the key may lack Stable Audio 3 access"
        code = "provider_model_access" if status == 403 else error.code
        return ServiceOutage(_MODEL_ACCESS, code=code, detail=f"{error.detail}; {hint}")
    return error


class StableAudio3Client:
    """One engine by id (sona/engines/base.py): `submit` pays, `fetch` reads what was paid for."""

    def __init__(
        self,
        settings: Settings,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._base_url = settings.stable_audio_3_api_url
        self._session = session or requests.Session()
        self.posts = 0
        self.fetches = 0

    @property
    def poll_interval_s(self) -> float:
        return self._settings.generation_poll_ms / 1000

    def _headers(self, accept: str, request: GenerationRequest | None = None) -> dict[str, str]:
        key = self._settings.stable_audio_api_key.get_secret_value()
        extra = request.headers() if request is not None else {}
        return {"authorization": f"Bearer {key}", "accept": accept, "user-agent": USER_AGENT, **extra}

    # -- pay -----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, deadline: Deadline) -> str:
        """One accepted generation's id. A refusal (4xx, 5xx, 429) accepted nothing, so retrying it
        pays nothing; a connection lost after the request went out may have been accepted (the
        one window no client can close: DESIGN.md, Stable Audio 3)."""
        policy = provider_retrying("provider call", self._settings, deadline, self._sleep)
        return policy(self._post_once, request, deadline)

    def _post_once(self, request: GenerationRequest, deadline: Deadline) -> str:
        left = deadline.check("generate", need_s=0.5)
        if request.endpoint == AUDIO_TO_AUDIO and request.source is None:
            raise PermanentError("The input audio was not read", detail="audio-to-audio without a source")
        self.posts += 1
        try:
            response = self._session.post(
                f"{self._base_url}/stable-audio/{request.endpoint}",
                headers=self._headers("application/json", request),
                files=request.form_fields(),
                timeout=(min(10.0, left), left),
            )
        except requests.RequestException as exc:
            raise _unanswered(exc, deadline) from None
        if response.status_code not in (200, 202):
            raise access_refused(response.status_code, response.content, response.headers, self._settings)
        return _generation_id(response.content)

    # -- read what was paid for ------------------------------------------------------------------
    def fetch(self, generation_id: str, model: str, deadline: Deadline) -> GeneratedAudio | None:
        """The audio, or None while in progress. A dropped or cut-off answer is retried (the
        generation stays on the provider's side); a 404 generation_not_found is GenerationGone."""
        policy = provider_retrying("result fetch", self._settings, deadline, self._sleep)
        result: GeneratedAudio | None = policy(self._get_once, generation_id, model, deadline)
        return result

    def _get_once(self, generation_id: str, model: str, deadline: Deadline) -> GeneratedAudio | None:
        left = deadline.check("fetch", need_s=0.2)
        self.fetches += 1
        try:
            response = self._session.get(
                f"{self._base_url}/results/{generation_id}",
                headers=self._headers(self._settings.stable_audio_accept),
                timeout=(min(10.0, left), left),
                stream=True,
            )
            with response, deadline.cuts(_socket_of(response)):
                body = _read_within(response, deadline)
        except requests.RequestException as exc:
            raise _unanswered(exc, deadline) from None
        if response.status_code == 202:
            return None
        if response.status_code == 200:
            return _generated(response, body, model)
        name, _ = _error_body(body)
        if response.status_code == 404 and name == NOT_FOUND:
            raise GenerationGone(
                "The audio service no longer has this generation",
                detail=f"{generation_id[:12]}…: {NOT_FOUND}",
            )
        raise access_refused(response.status_code, body, response.headers, self._settings)


def _generation_id(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    value = data.get("id") if isinstance(data, dict) else None
    if not isinstance(value, str) or not _ID.match(value):
        # Accepted (and so paid) but unreadable: retrying would pay again, so the job fails.
        raise PermanentError("The audio service accepted the request but sent no generation id")
    return value
