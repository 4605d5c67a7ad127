"""Helpers the tests share: database access as a given role, rows, audio, settings."""

from __future__ import annotations

import io
import json
import math
import struct
import uuid
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, cast

import httpx
import psycopg
from storage3 import SyncStorageClient
from storage3.constants import DEFAULT_TIMEOUT

from devstack.connections import shared as shared_connections
from devstack.events import CHANGES
from sona.audio.master import audioop  # the stdlib's, or audioop-lts on Python 3.13+
from sona.config import Settings, load_settings
from sona.rows import AudioInfo
from sona.tls import tls_context

AUDIO_INFO = AudioInfo(
    duration_s=5,
    sample_rate=44100,
    channels=2,
    sample_width_bytes=2,
    wav_bytes=10,
    mp3_bytes=5,
    mp3_bitrate="192k",
    provider_duration_s=5.1,
    trimmed=True,
    model="stable-audio-2.5",
)

# Under xdist: the key of config.workeroutput where a worker leaves its part of the hardening suite's
# ledger (tests/hardening/conftest.py: Ledger.as_data) for the controller, which merges the parts and
# prints one summary (tests/conftest.py).
LEDGER_KEY = "sona_hardening_ledger"
# pg_net's pause between batches (1 s, as pg_net has it: devstack/emulators/relay.py) is the webhook
# transport's own behaviour, tested as such with the relay alone (tests/test_webhook_delivery.py,
# test_pg_net_remeasured.py). In a stack whose tests are about something else it only made each job
# wait for the relay's next batch: 0.88 s a one-second job took from insert to completed, against
# 0.19 s with this pause (ten jobs one after another, same stack). Those stacks use this one.
RELAY_PAUSE_S = 0.05


class _Web:
    """httpx's one-call functions with the one TLS context sona's own clients share (sona.tls):
    httpx otherwise builds a context for each call, reading the CA bundle (10 to 40 ms of CPU), and
    the gateway and Storage tests make hundreds of calls."""

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, url, verify=tls_context(), **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)


web = _Web()


def storage_client(url: str, headers: dict[str, str]) -> SyncStorageClient:
    """storage3's client as a caller builds it, on the httpx client it would make for itself
    (storage3/_sync/client.py) but with the shared TLS context."""
    session = httpx.Client(
        headers=headers, timeout=DEFAULT_TIMEOUT, follow_redirects=True, http2=True, verify=tls_context()
    )
    return SyncStorageClient(url, headers, http_client=session)


SECRETS = {
    "supabase_service_role_key": "sb_secret_sentinel-service-key-7f3a9",
    "stable_audio_api_key": "sk-sentinel-stability-1c2d",
    "webhook_secret": "sentinel-webhook-secret-42",
}


def make_settings(**overrides: Any) -> Settings:
    """Direct dispatch unless a test asks for Cloud Tasks (which needs its queue settings)."""
    values: dict[str, Any] = {"supabase_url": "http://127.0.0.1:9", "dispatch": "direct", **SECRETS}
    values.update(overrides)
    return load_settings(env_file=None, **values)


@contextmanager
def connect(
    url: str, role: str | None = None, user_id: uuid.UUID | None = None
) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A transaction as a Supabase role (with the JWT subject set), committed on success; on a
    reused connection reset to a new session's state (devstack/connections.py)."""
    with shared_connections(url).borrow() as conn:
        if role:
            conn.execute(f"set role {role}")
        if user_id:
            claims = json.dumps({"sub": str(user_id), "role": role or "authenticated"})
            conn.execute("select set_config('request.jwt.claims', %s, false)", (claims,))
        yield conn


def new_user(url: str) -> uuid.UUID:
    with connect(url) as conn:
        row = conn.execute("insert into auth.users default values returning id").fetchone()
    assert row is not None
    return uuid.UUID(str(row["id"]))


def insert_job(url: str, **columns: Any) -> uuid.UUID:
    """Insert a row as the service role would (bypassing the plug-in's checks)."""
    values = {"user_id": columns.pop("user_id", None) or new_user(url), "prompt": "warm pad", **columns}
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    with connect(url) as conn:
        row = conn.execute(
            f"insert into public.jobs ({names}) values ({marks}) returning id",  # type: ignore[arg-type]
            list(values.values()),
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row["id"]))


def job_row(url: str, job_id: uuid.UUID) -> dict[str, Any]:
    with connect(url) as conn:
        row = conn.execute("select * from public.jobs where id = %s", (job_id,)).fetchone()
    assert row is not None
    return dict(row)


def sql(url: str, query: str, *params: Any, role: str | None = "service_role") -> list[dict[str, Any]]:
    with connect(url, role) as conn:
        cur = conn.execute(query, params or None)  # type: ignore[arg-type]
        return list(cur.fetchall()) if cur.description else []


def no_job_where(url: str, condition: str) -> bool:
    """No job row meets `condition`. Waits look again after every change the stack reports (several
    per job), so each look reads one boolean, not every row."""
    (row,) = sql(url, f"select not exists (select from public.jobs where {condition}) as nothing", role=None)
    return bool(row["nothing"])


def reclaimed(url: str, *args: int) -> dict[str, Any]:
    """What one reclaim_and_dispatch call (max attempts, grace seconds, limit, base and cap of the backoff in
    ms) did, as it answers: {"released": n, "failed": n, "dispatch": [{"job_id", "attempt",
    "dispatch_round"}, ...]}."""
    (row,) = sql(url, "select reclaim_and_dispatch(%s, %s, %s, %s, %s) as done", *args)
    return cast(dict[str, Any], row["done"])


def reclaim_actions(done: dict[str, Any]) -> list[str]:
    """A reclaim's answer as one action a job: the released and failed ones, then each dispatch."""
    counted = ["released"] * done["released"] + ["failed"] * done["failed"]
    return counted + ["dispatch"] * len(done["dispatch"])


def dispatched(done: dict[str, Any]) -> list[uuid.UUID]:
    """The jobs a reclaim stamped for dispatch."""
    return [uuid.UUID(d["job_id"]) for d in done["dispatch"]]


def wav_bytes(seconds: float, rate: int = 44_100, channels: int = 2, width: int = 2) -> bytes:
    """A sine tone WAV (stereo 16-bit by default)."""
    frames = round(seconds * rate)
    one = _one_second_of_tone(rate, channels)
    raw = (one * (frames // rate + 1))[: frames * channels * 2]
    if width == 3:
        raw = audioop.lin2lin(raw, 2, 3)  # each sample's two bytes under a zero low byte
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(raw)
    return out.getvalue()


@cache
def _one_second_of_tone(rate: int, channels: int) -> bytes:
    """440 Hz at 16 bits, built once per rate and layout: the suite asks for a few hundred WAVs,
    and building each second sample by sample took 46 ms."""
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) * channels for i in range(rate)
    )


def decoded_seconds(data: bytes, suffix: str) -> float:
    """Decode a file with ffmpeg, as a player would (from a file: an MP3's LAME header tells the
    decoder the encoder's padding, which a pipe cannot), and count the samples it produces."""
    import subprocess
    import tempfile

    from sona.audio.ffmpeg import find_ffmpeg

    with tempfile.NamedTemporaryFile(suffix=f".{suffix}") as f:
        f.write(data)
        f.flush()
        pcm = subprocess.run(
            [find_ffmpeg(), "-v", "error", "-i", f.name, "-f", "s16le", "-ac", "1", "-ar", "44100", "pipe:1"],
            capture_output=True,
            check=True,
        ).stdout
    return len(pcm) / 2 / 44100


def wait_until(
    check: Callable[[], Any], timeout_s: float = 30, what: str = "", poll_s: float | None = None
) -> Any:
    """`check()`'s first true answer, looked for again after each change the local world reports
    (devstack/events.py: the stack's database, the relay, the queue, the doubles); raises
    WaitTimedOut naming what it waited for. `poll_s` only for a world in another process, over a
    database the stack may not add its trigger to: nothing here hears of its changes."""
    return CHANGES.wait_until(check, timeout_s, what, poll_s)


class ManualClock:
    """A clock a test moves on by hand, for an emulator or a double that keeps time by it: the test
    shows what happens at a given moment without waiting for it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
