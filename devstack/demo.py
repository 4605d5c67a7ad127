"""`python -m devstack demo` and `python -m devstack dev`: the local stack for a person at a terminal."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.database import REPO_ROOT
from devstack.doubles.synth import LABEL
from devstack.events import WaitTimedOut
from devstack.plugin_generate import GenerateRequest, Mode, generate_through_gateway
from devstack.stack import TERMINAL, LocalStack

DEMO_ROOT = REPO_ROOT / ".sona"


# Stable Audio 3 takes 10-40 s to make a clip; the offline double takes a little, so the demo shows
# the wait (the row's generation id, then the audio) without making a person sit through it.
DEMO_GENERATION_S = 3.0
MODEL_SETTINGS = ("DESIGNER_MODEL", "PRODUCER_MODEL", "CREATOR_MODEL", "STABLE_AUDIO_MODEL")


def model_env(model: str | None) -> dict[str, str]:
    """--model: every mode's model setting names it (the environment's own settings otherwise)."""
    return {name: model for name in MODEL_SETTINGS} if model else {}


def _banner(stack: LocalStack) -> str:
    if stack.real_provider:
        return "Provider: Stable Audio (STABLE_AUDIO_API_KEY is set; this call is paid)"
    return f"Provider: {LABEL}.\n  Set STABLE_AUDIO_API_KEY to generate with the real model."


@dataclass(frozen=True)
class PluginRequest:
    """What the musician asks the plug-in's generate for besides the prompt (docs/plugin-client.md)."""

    mode: Mode = "designer"
    bpm: float | None = None
    key: str | None = None  # "A minor"

    def generate_request(self, prompt: str, duration: int, quality: str) -> GenerateRequest:
        key, _, scale = (self.key or "").partition(" ")
        bpm = None if self.bpm is None else (int(self.bpm) if self.bpm.is_integer() else self.bpm)
        return GenerateRequest(
            prompt,
            duration,
            quality,
            self.mode,
            key=key or None,
            scale=scale or None,
            bpm=bpm,
        )


def demo(
    prompt: str,
    duration: int,
    quality: str,
    input_file: Path | None = None,
    strength: float | None = None,
    plugin: PluginRequest | None = None,
    model: str | None = None,
    *,
    as_json: bool = False,
    database_url: str | None = None,
) -> int:
    """One job end to end. With `plugin` (the default from the command line) as the plug-in makes
    it: generate's charge and queued insert, then what the musician gets; without it (the earlier
    worker's flow, or audio-to-audio with `input_file`) the pending insert and the row's URLs."""
    # Unique even for two demos started in the same second (the test suite runs them in parallel).
    DEMO_ROOT.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"demo-{time.strftime('%Y%m%d-%H%M%S')}-", dir=DEMO_ROOT))
    print(f"Starting the local stack in {root} ...", flush=True)
    started = time.monotonic()
    env = model_env(model)
    # One job needs no reclaim_jobs process (dev starts it): one start fewer, about 0.3 CPU-s.
    with LocalStack(
        root,
        env=env,
        double_generation_s=DEMO_GENERATION_S,
        database_url=database_url,
        reclaim_function=False,
    ) as stack:
        print(
            f"Ready in {time.monotonic() - started:.1f} s: PostgreSQL, gateway {stack.supabase_url},"
            f" process_job {stack.process_job_url}",
            flush=True,
        )
        print(_banner(stack), flush=True)
        if plugin is not None:
            job_id = _as_the_plugin(stack, plugin.generate_request(prompt, duration, quality))
            if job_id is None:
                return 1
        elif input_file is None:
            job_id = stack.insert_job(prompt, duration, quality)
            print(f"Inserted job {job_id} ({duration} s, {quality}): {prompt!r}", flush=True)
        else:
            job_id = _audio_to_audio(stack, prompt, duration, quality, input_file, strength)
        row = _follow(stack, job_id, stack.settings().job_timeout_ms / 1000 + 30)
        if as_json:
            print(json.dumps(_shown(row), indent=2, default=str))
        elif plugin is not None:
            _musician_report(stack, row)
        else:
            _report(stack, row)
        if row["status"] != "completed":
            print(f"Job {row['status']}: {row['error_message']}", file=sys.stderr)
        return 0 if row["status"] == "completed" else 1


def _as_the_plugin(stack: LocalStack, request: GenerateRequest) -> uuid.UUID | None:
    """A new musician asks generate for a job: charged where the plug-in's token tables exist (its
    welcome bonus, then the price it words), inserted queued with the service role as one object;
    the balance read before and after as the billing page reads it."""
    user_id = stack.create_user()
    charged = stack.has_token_tables()
    before = _balance(stack, user_id) if charged else None
    answer = generate_through_gateway(stack.gateway, user_id, request, charge=charged)
    if answer.status != 201 or answer.job is None:
        print(f"generate answered {answer.status}: {json.dumps(answer.error)}", file=sys.stderr)
        return None
    print(
        f"Inserted {request.tier} job {answer.job['id']} as the plug-in's generate does "
        f"(queued, {request.seconds} s, {request.quality_sent}): {request.prompt!r}",
        flush=True,
    )
    if before is None:
        print("Tokens: this database has none of the plug-in's token tables; nothing charged", flush=True)
    else:
        after = _balance(stack, user_id)
        charge = f"{answer.tokens_charged} charged: {request.description()}"
        print(f"Tokens: {before} before, {after} after ({charge})", flush=True)
    return uuid.UUID(answer.job["id"])


def _balance(stack: LocalStack, user_id: uuid.UUID) -> int:
    """The billing page's read (use-billing.ts): the user's row as one object, 0 on PGRST116."""
    import requests

    answer = requests.get(
        f"{stack.supabase_url}/rest/v1/user_tokens?select=balance&user_id=eq.{user_id}",
        headers={
            "apikey": stack.publishable_key,
            "Authorization": f"Bearer {stack.user_token(user_id)}",
            "Accept": "application/vnd.pgrst.object+json",
        },
        timeout=10,
    )
    return int(answer.json()["balance"]) if answer.status_code == 200 else 0


def _audio_to_audio(
    stack: LocalStack, prompt: str, duration: int, quality: str, input_file: Path, strength: float | None
) -> uuid.UUID:
    """Upload the file into a new user's folder as the plug-in would, then insert the job."""
    from sona.audio.input_audio import CONTENT_TYPES, sniff

    data = input_file.read_bytes()
    content_type = CONTENT_TYPES.get(sniff(data) or "", "application/octet-stream")
    user_id = stack.create_user()
    path = stack.upload_input(user_id, input_file.name, data, content_type)
    print(f"Uploaded {input_file} ({len(data)} bytes) as {path}", flush=True)
    job_id = stack.insert_job(
        prompt, duration, quality, mode="audio-to-audio", user_id=user_id, input_path=path, strength=strength
    )
    print(
        f"Inserted audio-to-audio job {job_id} ({duration} s, {quality}, strength "
        f"{'default' if strength is None else strength}): {prompt!r}",
        flush=True,
    )
    return job_id


def _follow(stack: LocalStack, job_id: uuid.UUID, timeout_s: float) -> dict[str, Any]:
    """Print each status the job's row takes, the moment the database reports its change."""
    seen = None
    started = time.monotonic()
    while True:
        row = stack.job(job_id)
        if row["status"] != seen:
            seen = row["status"]
            print(
                f"  {time.monotonic() - started:6.2f} s  {seen}"
                f"{' (attempt ' + str(row['attempts']) + ')' if row['attempts'] else ''}",
                flush=True,
            )
        left = started + timeout_s - time.monotonic()
        if seen in TERMINAL or left <= 0:
            return row
        with contextlib.suppress(WaitTimedOut):  # then the row as it is, as before
            moved = lambda was=seen: stack.job(job_id)["status"] != was  # noqa: E731
            stack.wait_until(moved, left, f"job {job_id} to move on from {seen}")


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (str(v) if v is not None and not isinstance(v, (int, float, dict)) else v)
        for k, v in row.items()
        if k not in ("lease_token",)
    }


def _musician_report(stack: LocalStack, row: dict[str, Any]) -> None:
    """What the plug-in shows a musician: the mode, the prompt the model got, the file's name, the
    preview it plays and how long it is; and where the files are on this disk."""
    if row["status"] != "completed":
        return
    from sona.audio.ffmpeg import find_ffmpeg
    from sona.audio.master import decoded_seconds

    bucket = stack.root / "storage" / stack.settings().supabase_storage_bucket
    preview, master = bucket / row["preview_path"], bucket / row["master_path"]
    seconds = decoded_seconds(preview.read_bytes(), "mp3", find_ffmpeg(stack.settings().ffmpeg_binary))
    print(f"Mode:        {row['mode']}")
    print(f"Prompt sent: {row['enhanced_prompt']!r}")
    print(f"File name:   {row['filename']!r}")
    print(f"Preview:     {row['preview_path']} ({seconds:.1f} s), signed for an hour by the player")
    print(f"On disk:     {preview}\n             {master} (the WAV master)")
    if not stack.real_provider:
        print(f"Note: the audio came from the {LABEL}; --json shows the whole row.")


def _report(stack: LocalStack, row: dict[str, Any]) -> None:
    print(json.dumps(_shown(row), indent=2, default=str))
    if row["status"] == "completed":
        if row.get("preview_path"):
            print(f"Player: preview_path {row['preview_path']}, download name {row['filename']!r}")
        print(f"WAV: {row['wav_url']}\n     {stack.local_file(row['wav_url'])}")
        print(f"MP3: {row['mp3_url']}\n     {stack.local_file(row['mp3_url'])}")
        print("(The URLs are served while the stack runs; the files stay.)")
        if not stack.real_provider:
            print(f"Note: audio.model is the model the job asked for; this audio came from the {LABEL}.")


def dev(
    as_json: bool,
    ports: dict[str, int],
    root: Path | None = None,
    database_url: str | None = None,
    functions_url: str | None = None,
) -> int:
    DEMO_ROOT.mkdir(exist_ok=True)
    root = root or Path(tempfile.mkdtemp(prefix="dev-", dir=DEMO_ROOT))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalStack(root, ports=ports, database_url=database_url, functions_url=functions_url) as stack:
        # A signed-in local user, so a client can insert and cancel jobs as the plug-in does.
        info = {**stack.describe(), **stack.sign_in()}
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            print(_banner(stack))
            for key, value in info.items():
                print(f"{key:>22}: {value}")
            print("Running; Ctrl-C stops it.", flush=True)
        # A wait with a timeout: the signal may land on one of the stack's threads, and a main
        # thread blocked in a plain wait() would never run the handler (the dev test hung so).
        while not stop.wait(timeout=0.2):
            pass
    return 0
