"""A loopback stand-in for Stability AI's text-to-audio and audio-to-audio endpoints, following their
documented contract.

It validates requests like the real API (multipart only, bearer auth, field ranges and defaults),
answers WAV or MP3 at 44.1 kHz stereo (or base64 JSON), overshoots the requested length like the
real service, and can be scripted to answer any documented error, to be slow, or to send truncated,
trickling or corrupt audio. Audio-to-audio takes the `audio` file part (MP3 or WAV, 6 to 190 s,
the request at most 50 MB) and `strength`, and answers the input mixed into the synthesiser's audio
by strength (0 the input, 1 none of it), so a test can tell the input was used. It counts calls and
the generations it finished (which are paid for, however their delivery then goes), so tests can
assert how many paid generations happened.

Stable Audio 3 (docs/outside-services.md "Stable Audio 3"; issue 22, read from Stability's OpenAPI spec
and its explainer of 2026-11-23) is served beside it, asynchronously:
- `POST /v2beta/audio/stable-audio/{text-to-audio|audio-to-audio}` (the path says `stable-audio`),
  `model` = `stable-audio-3` only, `duration` 1-380 s (default 190), `steps` 4-8, `strength` 0-1,
  audio inputs 6-380 s, requests up to 100 MB: answers **202 `{"id": <64 hex>}`** once accepted.
  Whether an accepted generation that is never fetched is charged is not stated: the double counts
  every accepted one as paid (the cautious reading). The 150-in-10 s limit (then 60 s) is declared
  on POSTs only, so only POSTs count towards it.
- `GET /v2beta/audio/results/{id}`: **202 `{"id", "status": "in-progress"}`** for `generation_s`
  after the POST, then **200** with the audio (bytes and `finish-reason`/`seed` headers for
  `accept: audio/*`, base64 JSON for `application/json`); **404 `generation_not_found`** for an id
  it never issued or one older than `retention_s` (24 h: the generic results endpoint's documented
  retention). Fetches are free and may repeat; GET answers can be scripted like POST answers
  (dropped mid-body, trickling, errors).
- Each SA3 operation is gated by a per-account access flag whose refusal is undocumented: with
  `sa3_access` False the double answers 403 `{"name": "permission_denied"}`.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from werkzeug.formparser import parse_form_data

from devstack.doubles.synth import RATE, synthesize_pcm, synthesize_wav
from devstack.events import CHANGES
from devstack.serving import serve_in_thread, stop_server

# The real service returns about 61.6 s for a 60 s request.
OVERSHOOT = 61.6 / 60
MODELS = {"stable-audio-2": (30, 100, 50), "stable-audio-2.5": (4, 8, 8)}  # min, max, default steps
MIN_STRENGTH = {"stable-audio-2": 0.0, "stable-audio-2.5": 0.01}
MAX_REQUEST_BYTES = 50 * 1000 * 1000
ENDPOINTS = ("text-to-audio", "audio-to-audio")
# Stable Audio 3 (the asynchronous family): its routes, its one model and its limits.
V3_PREFIX = "/v2beta/audio/stable-audio/"
RESULTS_PREFIX = "/v2beta/audio/results/"
V3_MODEL = "stable-audio-3"
V3_MAX_DURATION_S = 380
V3_MAX_REQUEST_BYTES = 100 * 1000 * 1000
RETENTION_S = 24 * 3600.0

ERRORS: dict[int, tuple[str, str]] = {
    400: ("bad_request", "prompt: cannot be empty"),
    401: ("unauthorized", "authorization: invalid or missing header value"),
    402: (
        "payment_required",
        "You lack sufficient credits to make this request. Please purchase "
        "more credits at https://platform.stability.ai/account/credits and try again.",
    ),
    403: (
        "content_moderation",
        "Your request was flagged by our content moderation system, as a "
        "result your request was denied and you were not charged.",
    ),
    404: ("not_found", "The requested resource was not found."),
    413: ("payload_too_large", "body: payloads cannot be larger than 10MiB in size"),
    422: ("invalid_language", "English is the only supported language for this service."),
    429: (
        "rate_limit_exceeded",
        "You have exceeded the rate limit of 150 requests within a 10 "
        "second period, and have been timed out for 60 seconds.",
    ),
    500: ("internal_error", "An unexpected server error has occurred, please try again later."),
    502: ("bad_gateway", "Bad gateway."),
    503: ("service_unavailable", "The service is temporarily unavailable."),
}

CDN_403_HTML = b"<html><head><title>403 Forbidden</title></head><body><h1>403 Forbidden</h1></body></html>"

Kind = Literal[
    "ok", "error", "html403", "slow", "truncate", "trickle", "corrupt", "empty", "drop", "filtered"
]
# `trickle`: the whole answer, a few bytes at a time (a congested link), as long as the caller reads.
TRICKLE_BYTES = 1024
TRICKLE_EVERY_S = 0.05


@dataclass
class Behaviour:
    """One scripted answer. `ok` is the default for an empty script."""

    kind: Kind = "ok"
    status: int = 200
    delay_s: float = 0.0  # before the first byte
    headers: dict[str, str] = field(default_factory=dict)
    # Stable Audio 3 POSTs: the generation exists (and is paid for) this long before its 202 leaves.
    after_accept_s: float = 0.0


@dataclass
class RateLimit:
    """Stability's limit: more than `requests` in `window_s` refuses every request for `lockout_s`
    (150 in 10 s, then 60 s; scale all three down for tests). `clock` is the time the window and
    the lockout are counted on: a test moves it on instead of waiting them out."""

    requests: int = 150
    window_s: float = 10.0
    lockout_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _seen: deque[float] = field(default_factory=deque)
    _locked_until: float = 0.0

    def admit(self, now: float) -> bool:
        """Count a request; False while locked out (a refused request does not lift the lockout)."""
        if now < self._locked_until:
            return False
        while self._seen and self._seen[0] <= now - self.window_s:
            self._seen.popleft()
        if len(self._seen) >= self.requests:
            self._locked_until = now + self.lockout_s
            self._seen.clear()
            return False
        self._seen.append(now)
        return True


@dataclass
class Call:
    headers: dict[str, str]
    fields: dict[str, str]
    content_type: str
    endpoint: str = "text-to-audio"
    files: dict[str, bytes] = field(default_factory=dict)  # file parts as sent (the `audio` input)
    size: int = 0  # the request body's bytes
    api: Literal["v2", "v3"] = "v2"  # v3: Stable Audio 3's asynchronous routes
    answered: int = 0
    paid: bool = False  # a generation that finished, which Stability charges for
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    generation_id: str | None = None  # Stable Audio 3: the id its 202 carried


@dataclass
class Generation:
    """A Stable Audio 3 generation: accepted (paid) at `created`, ready `generation_s` later."""

    id: str
    call: Call
    created: float
    ready_at: float
    fetched: int = 0  # 200 answers sent for it
    asked: int = 0  # GET results requests for it, in progress or not


def error_body(status: int, errors: list[str] | None = None, name: str | None = None) -> bytes:
    default_name, message = ERRORS.get(status, ("error", f"HTTP {status}"))
    body = {"id": uuid.uuid4().hex, "name": name or default_name, "errors": errors or [message]}
    return json.dumps(body).encode()


class StableAudioDouble:
    def __init__(
        self,
        api_key: str,
        *,
        latency_s: float = 0.0,
        overshoot: float = OVERSHOOT,
        rate_limit: RateLimit | None = None,
        generation_s: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.generation_s = generation_s  # how long a Stable Audio 3 generation runs
        self.retention_s = RETENTION_S
        self.sa3_access = True
        self.generations: dict[str, Generation] = {}
        # The next generations' lengths, in POST order (the benchmark's mix); then generation_s.
        self.generation_plan: deque[float] = deque()
        self.fetch_count = 0  # GET results requests answered
        self._fetch_script: deque[Behaviour] = deque()
        self.latency_s = latency_s
        self.overshoot = overshoot
        self.rate_limit = rate_limit
        self.rate_limited = 0  # 429 rate_limit_exceeded answers sent
        self.calls: list[Call] = []
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- control ---------------------------------------------------------------------------
    def script(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def script_fetch(self, *behaviours: Behaviour) -> None:
        """Answers for the next GET results requests (Stable Audio 3), after which they are served."""
        with self._lock:
            self._fetch_script.extend(behaviours)

    def expire(self, generation_id: str) -> None:
        """As if its retention ran out: the next GET answers 404 generation_not_found."""
        with self._lock:
            generation = self.generations[generation_id]
            generation.created -= self.retention_s + 1

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._fetch_script.clear()
            self.calls.clear()
            self.generations.clear()
            self.fetch_count = 0
            self.rate_limited = 0
            self.sa3_access = True

    @property
    def paid_generations(self) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.paid)

    @property
    def max_concurrency(self) -> int:
        """The most calls (since the last reset) it was answering at the same moment."""
        with self._lock:
            edges = sorted(
                [(c.started, 1) for c in self.calls]
                + [(c.finished, -1) for c in self.calls if c.finished is not None]
            )
        most = now = 0
        for _, step in edges:
            now += step
            most = max(most, now)
        return most

    @property
    def call_count(self) -> int:
        with self._lock:
            return len(self.calls)

    def _admit(self) -> bool:
        with self._lock:
            if self.rate_limit is None or self.rate_limit.admit(self.rate_limit.clock()):
                return True
            self.rate_limited += 1
            return False

    def _next(self) -> Behaviour:
        with self._lock:
            return self._script.popleft() if self._script else Behaviour()

    def _next_fetch(self) -> Behaviour:
        with self._lock:
            self.fetch_count += 1
            return self._fetch_script.popleft() if self._fetch_script else Behaviour()

    def _accept(self, call: Call) -> Generation:
        now = time.monotonic()
        with self._lock:
            takes = self.generation_plan.popleft() if self.generation_plan else self.generation_s
            generation = Generation(uuid.uuid4().hex + uuid.uuid4().hex, call, now, now + takes)
            self.generations[generation.id] = generation
        call.generation_id = generation.id
        call.paid = True
        CHANGES.notify()
        return generation

    def _generation(self, generation_id: str) -> Generation | None:
        """The generation while it is kept; None once unknown or past its retention."""
        with self._lock:
            generation = self.generations.get(generation_id)
        if generation is None or time.monotonic() > generation.created + self.retention_s:
            return None
        return generation

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        double = self

        class Handler(_Handler):
            owner = double

        self._server = ThreadingHTTPServer((host, port), Handler)
        serve_in_thread(self._server, "stable-audio")
        self.url = f"http://{host}:{self._server.server_port}/v2beta/audio/stable-audio-2"
        self.v3_url = f"http://{host}:{self._server.server_port}/v2beta/audio"  # Stable Audio 3's base
        return self.url

    def stop(self) -> None:
        stop_server(self._server)
        self._server = None

    # -- the contract ----------------------------------------------------------------------
    def validate(self, call: Call) -> tuple[int, list[str]] | None:
        auth = call.headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            return 401, [ERRORS[401][1]]
        if not call.content_type.startswith("multipart/form-data"):
            return 400, ["content-type: must be multipart/form-data"]
        accept = call.headers.get("accept", "audio/*")
        if accept not in ("*/*", "audio/*", "application/json", "audio/mpeg", "audio/wav"):
            return 400, ["accept: must be one of audio/* or application/json"]
        f = call.fields
        problems = []
        prompt = f.get("prompt", "")
        if not prompt.strip():
            problems.append("prompt: cannot be empty")
        elif len(prompt) > 10_000:
            problems.append("prompt: must be at most 10000 characters")
        v3 = call.api == "v3"
        model = f.get("model", V3_MODEL if v3 else "stable-audio-2")
        models = {V3_MODEL: (4, 8, 8)} if v3 else MODELS
        if model not in models:
            problems.append(f"model: must be one of {', '.join(models)}")
        else:
            low, high, _ = models[model]
            if "steps" in f and not _int_in(f["steps"], low, high):
                problems.append(f"steps: must be an integer from {low} to {high}")
        longest = V3_MAX_DURATION_S if v3 else 190
        if "duration" in f and not _number_in(f["duration"], 1, longest):
            problems.append(f"duration: must be a number from 1 to {longest}")
        if "seed" in f and not _int_in(f["seed"], 0, 4294967294):
            problems.append("seed: must be an integer from 0 to 4294967294")
        if "cfg_scale" in f and not _number_in(f["cfg_scale"], 1, 25):
            problems.append("cfg_scale: must be a number from 1 to 25")
        if f.get("output_format", "mp3") not in ("mp3", "wav"):
            problems.append("output_format: must be one of mp3, wav")
        if call.endpoint == "audio-to-audio":
            problems.extend(_audio_problems(call, model))
        return (400, problems) if problems else None

    def render(self, call: Call) -> tuple[bytes, str]:
        seconds = float(call.fields.get("duration", "190")) * self.overshoot
        output_format = call.fields.get("output_format", "mp3")
        if call.endpoint == "audio-to-audio":
            strength = float(call.fields.get("strength", "1"))
            return _render_from(call.files["audio"], call.fields["prompt"], seconds, strength, output_format)
        return _render(call.fields["prompt"], seconds, output_format)


def _audio_problems(call: Call, model: str) -> list[str]:
    """audio-to-audio's own checks: the `audio` part, its format and length, and `strength`."""
    problems = []
    low = MIN_STRENGTH.get(model, 0.0)
    longest = V3_MAX_DURATION_S if call.api == "v3" else 190
    if "strength" in call.fields and not _number_in(call.fields["strength"], low, 1):
        problems.append(f"strength: must be a number from {low:g} to 1")
    audio = call.files.get("audio")
    if not audio:
        return [*problems, "audio: is required"]
    seconds = _input_seconds(audio)
    if seconds is None:
        problems.append("audio: must be a valid MP3 or WAV file")
    elif not 6 <= seconds <= longest:
        problems.append(f"audio: duration must be between 6 and {longest} seconds, got {seconds:.1f}")
    return problems


def _input_seconds(audio: bytes) -> float | None:
    """How long an MP3 or WAV plays (ffmpeg decodes it), or None for anything else."""
    import subprocess

    from sona.audio.ffmpeg import find_ffmpeg
    from sona.audio.input_audio import sniff
    from sona.audio.master import decoded_seconds

    fmt = sniff(audio)
    if fmt is None:
        return None
    try:
        return decoded_seconds(audio, fmt, find_ffmpeg())
    except subprocess.CalledProcessError:
        return None


def _render_from(
    audio: bytes, prompt: str, seconds: float, strength: float, output_format: str
) -> tuple[bytes, str]:
    """The input (looped to length) mixed with the synthesiser's audio: (1 - strength) of the one,
    strength of the other."""
    from pydub.utils import audioop

    from sona.audio.ffmpeg import find_ffmpeg
    from sona.audio.master import _ffmpeg, wav_header

    ffmpeg = find_ffmpeg()
    source = _ffmpeg(ffmpeg, ["-i", "pipe:0", "-ac", "2", "-ar", str(RATE), "-f", "s16le", "pipe:1"], audio)
    size = max(1, round(seconds * RATE)) * 4
    source = (source * (size // len(source) + 1))[:size]
    synth = synthesize_pcm(prompt, seconds)[:size]
    size = min(size, len(synth))  # pydub's fades may round the synthesised length
    source, synth = source[:size], synth[:size]
    mixed = audioop.add(audioop.mul(source, 2, 1 - strength), audioop.mul(synth, 2, strength), 2)
    wav = wav_header(RATE, 2, 2, len(mixed) // 4) + mixed
    if output_format == "mp3":
        from sona.audio.master import encode_mp3

        return encode_mp3(wav, "192k", ffmpeg), "audio/mpeg"
    return wav, "audio/wav"


@lru_cache(maxsize=16)
def _render(prompt: str, seconds: float, output_format: str) -> tuple[bytes, str]:
    """Deterministic, so repeated requests (benchmarks) are answered without rendering again."""
    wav = synthesize_wav(prompt, seconds)
    if output_format == "mp3":
        from sona.audio.ffmpeg import find_ffmpeg
        from sona.audio.master import encode_mp3

        return encode_mp3(wav, "192k", find_ffmpeg()), "audio/mpeg"
    return wav, "audio/wav"


def _int_in(value: str, low: int, high: int) -> bool:
    return value.lstrip("-").isdigit() and low <= int(value) <= high


def _number_in(value: str, low: float, high: float) -> bool:
    try:
        return low <= float(value) <= high
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    owner: StableAudioDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        content_type = self.headers.get("content-type", "")
        headers = {k.lower(): v for k, v in self.headers.items()}
        fields, files = _form_parts(body, content_type)
        endpoint = self.path.rsplit("/", 1)[-1]
        api: Literal["v2", "v3"] = "v3" if self.path.startswith(V3_PREFIX) else "v2"
        call = Call(headers, fields, content_type, endpoint, files, size=len(body), api=api)
        with self.owner._lock:
            self.owner.calls.append(call)
        CHANGES.notify()
        try:
            self._answer_v3(call) if api == "v3" else self._answer(call)
        finally:
            call.finished = time.monotonic()
            CHANGES.notify()

    # -- Stable Audio 3 ----------------------------------------------------------------------------
    def _answer_v3(self, call: Call) -> None:
        """POST: validate, accept (paid), answer 202 with the id."""
        double = self.owner
        if call.endpoint not in ENDPOINTS:
            return self._send(call, 404, error_body(404), "application/json")
        if call.size > V3_MAX_REQUEST_BYTES:
            return self._send(call, 413, error_body(413), "application/json")
        if not double._admit():
            return self._send(call, 429, error_body(429), "application/json")
        behaviour = double._next()
        time.sleep(behaviour.delay_s)
        refused = self._refused_v3(call.headers)
        if refused is not None:
            return self._send(call, refused[0], refused[1], "application/json")
        invalid = double.validate(call)
        if invalid is not None:
            return self._send(call, invalid[0], error_body(*invalid), "application/json")
        if behaviour.kind == "error":
            body = error_body(behaviour.status)
            return self._send(call, behaviour.status, body, "application/json", behaviour.headers)
        if behaviour.kind == "html403":
            return self._send(call, 403, CDN_403_HTML, "text/html")
        if behaviour.kind == "drop":  # before anything was accepted: nothing is paid
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        generation = double._accept(call)
        time.sleep(behaviour.after_accept_s)
        body = json.dumps({"id": generation.id}).encode()
        try:
            self._send(call, 202, body, "application/json", charge=True)
        except OSError:
            self.close_connection = True  # the caller is gone; the generation runs (and is paid) anyway
        return None

    def _refused_v3(self, headers: dict[str, str]) -> tuple[int, bytes] | None:
        if headers.get("authorization", "") != f"Bearer {self.owner.api_key}":
            return 401, error_body(401)
        if not self.owner.sa3_access:
            message = "This account does not have access to stable-audio-3."
            return 403, error_body(403, [message], name="permission_denied")
        return None

    def do_GET(self) -> None:
        """GET results/{id}: 202 while running, 200 with the audio, 404 once unknown or expired."""
        double = self.owner
        headers = {k.lower(): v for k, v in self.headers.items()}
        call = Call(headers, {}, "", "results", api="v3")  # not booked in `calls`: a fetch pays nothing
        if not self.path.startswith(RESULTS_PREFIX):
            return self._send(call, 404, error_body(404), "application/json")
        behaviour = double._next_fetch()
        time.sleep(behaviour.delay_s)
        refused = self._refused_v3(headers)
        if refused is not None:
            return self._send(call, refused[0], refused[1], "application/json")
        if behaviour.kind == "error":
            body = error_body(behaviour.status)
            return self._send(call, behaviour.status, body, "application/json", behaviour.headers)
        if behaviour.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        generation = double._generation(self.path[len(RESULTS_PREFIX) :])
        if generation is not None:
            generation.asked += 1
        if generation is None:
            expired = ["Generation not found, it may have expired."]
            gone = error_body(404, expired, name="generation_not_found")
            return self._send(call, 404, gone, "application/json")
        if time.monotonic() < generation.ready_at:
            body = json.dumps({"id": generation.id, "status": "in-progress"}).encode()
            return self._send(call, 202, body, "application/json")
        audio, audio_type = double.render(generation.call)
        seed = generation.call.fields.get("seed", "0")
        seed = seed if seed != "0" else str(int(generation.id[:8], 16) % 4294967294)
        generation.fetched += 1
        if headers.get("accept") == "application/json":
            payload = {
                "audio": base64.b64encode(audio).decode(),
                "finish_reason": "SUCCESS",
                "seed": int(seed),
            }
            body = json.dumps(payload).encode()
            return self._send(call, 200, body, "application/json", delivery=behaviour.kind)
        extra = {"finish-reason": "SUCCESS", "seed": seed}
        return self._send(call, 200, audio, audio_type, extra, delivery=behaviour.kind)

    def _answer(self, call: Call) -> None:
        double = self.owner
        headers = call.headers
        if call.endpoint not in ENDPOINTS:
            return self._send(call, 404, error_body(404), "application/json")
        if call.size > MAX_REQUEST_BYTES:
            return self._send(call, 413, error_body(413), "application/json")
        if not double._admit():
            return self._send(call, 429, error_body(429), "application/json")
        behaviour = double._next()
        time.sleep(behaviour.delay_s)
        invalid = double.validate(call)
        if invalid is not None:
            return self._send(call, invalid[0], error_body(*invalid), "application/json")
        if behaviour.kind == "error":
            return self._send(
                call,
                behaviour.status,
                error_body(behaviour.status),
                "application/json",
                behaviour.headers,
            )
        if behaviour.kind == "html403":
            return self._send(call, 403, CDN_403_HTML, "text/html")
        if behaviour.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        time.sleep(double.latency_s)
        if self._client_gone():
            call.answered = 499  # the caller hung up before the generation finished: no charge
            self.close_connection = True
            return None
        audio, audio_type = double.render(call)
        seed = call.fields.get("seed", "0")
        seed = seed if seed != "0" else str(uuid.uuid4().int % 4294967294)
        finish = "CONTENT_FILTERED" if behaviour.kind == "filtered" else "SUCCESS"
        if behaviour.kind == "corrupt":
            audio = b"RIFF\x00\x00\x00\x00WAVEnot really audio" + bytes(64)
        elif behaviour.kind == "empty":
            audio = b""
        charge = behaviour.kind != "filtered"  # a filtered generation is not charged
        if headers.get("accept") == "application/json":
            body = json.dumps(
                {
                    "audio": base64.b64encode(audio).decode(),
                    "finish_reason": finish,
                    "seed": int(seed),
                }
            ).encode()
            return self._send(call, 200, body, "application/json", delivery=behaviour.kind, charge=charge)
        return self._send(
            call,
            200,
            audio,
            audio_type,
            {"finish-reason": finish, "seed": seed},
            delivery=behaviour.kind,
            charge=charge,
        )

    def _send(
        self,
        call: Call,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        delivery: Kind = "ok",
        charge: bool = False,
    ) -> None:
        call.answered = status
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        # The generation has finished: Stability charges for it now, whether its bytes then arrive
        # whole, cut off mid-body or not at all. Only a failed generation is free. (A Stable Audio 3
        # generation was charged when it was accepted; fetching it charges nothing more.)
        if charge and not call.paid:
            call.paid = True
            CHANGES.notify()  # only a change reports: a GET of a result (a read) does not
        if delivery == "truncate":
            # Half the promised bytes, then the connection drops.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if delivery == "trickle":
            return self._trickle(body)
        self.wfile.write(body)
        self.wfile.flush()

    def _trickle(self, body: bytes) -> None:
        try:
            for start in range(0, len(body), TRICKLE_BYTES):
                self.wfile.write(body[start : start + TRICKLE_BYTES])
                self.wfile.flush()
                time.sleep(TRICKLE_EVERY_S)
        except OSError:
            self.close_connection = True  # the caller gave up: the audio was paid for anyway

    def _client_gone(self) -> bool:
        """True when the caller closed its connection (a readable socket with nothing to read)."""
        self.connection.setblocking(False)
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        finally:
            self.connection.setblocking(True)


def _form_parts(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """The text fields (a text field sent as a file part counts too) and the raw file parts."""
    environ = {
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": content_type,
        "REQUEST_METHOD": "POST",
    }
    _, form, file_parts = parse_form_data(environ, max_form_memory_size=None)
    files = {k: v.read() for k, v in file_parts.items()}
    fields = {k: v for k, v in form.items()}
    fields.update({k: v.decode(errors="replace") for k, v in files.items() if k != "audio"})
    return fields, files
