"""Settings from the environment (and an optional .env), validated all at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from sona.environment import ENV_FILE, ConfigError, EnvironmentSettings, environment_names, load
from sona.store import storage_rules
from sona.store.supabase_keys import key_problem, key_warning

DEFAULT_STABLE_AUDIO_API_URL = "https://api.stability.ai/v2beta/audio/stable-audio-2"
# The earlier worker's default: not a real route, so validation warns about it.
OLD_STABLE_AUDIO_API_URL = "https://api.stability.ai/v2beta/stable-audio"

# Cloud Functions 2nd gen caps an HTTP function at 3600 s.
MAX_FUNCTION_TIMEOUT_S = 3600
# The function's --timeout is the job budget plus this, so the platform never kills a job
# that is still recording its own failure.
FUNCTION_TIMEOUT_MARGIN_S = 10
# The lease outlives the invocation by this much, so reclaim never races a live invocation.
LEASE_MARGIN_S = 30

SECRET_FIELDS = (
    "supabase_service_role_key",
    "stable_audio_api_key",
    "webhook_secret",
    "replicate_api_token",
)
# The earlier worker's .env names the README still accepts: read by nothing, named once when set.
IGNORED_SETTINGS = {
    "POLL_INTERVAL_MS": "the webhook replaced polling",
    "REPLICATE_WEBHOOK_SECRET": "Replicate's webhook is not received: a TangoFlux job polls its prediction",
}
# Cloud Tasks allows a task's dispatch deadline between 15 s and 30 minutes.
MIN_DISPATCH_DEADLINE_S, MAX_DISPATCH_DEADLINE_S = 15, 1800
# A task's deadline covers more than the function's run: at max instances Cloud Run holds a request
# up to about 10 s for a free instance, and may then start one (cold start). Without this room a
# held task would be cut at the deadline while its job still runs, and be sent again.
DISPATCH_ROOM_S = 30
# Stable Audio allows 150 requests in 10 s, then refuses everything for 60 s.
PROVIDER_RATE_LIMIT_PER_S = 15

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
# The models a mode may name (sona/job/modes.py MODELS says which engine serves each).
StableAudioModel = Literal["stable-audio-2.5", "stable-audio-2", "stable-audio-3"]
# A plug-in mode may also be served by TangoFlux on Replicate (text-to-audio only, up to 30 s).
ModelName = StableAudioModel | Literal["tangoflux"]
PLUGIN_MODE_MODELS = ("designer_model", "producer_model", "creator_model")
# Each plug-in mode's model for rows longer than its own model makes (sona/job/modes.py model_for).
FALLBACK_MODELS = ("designer_fallback_model", "producer_fallback_model", "creator_fallback_model")
# Stable Audio 3's asynchronous routes sit under this base: POST {base}/stable-audio/{endpoint},
# GET {base}/results/{id} (DESIGN.md, Stable Audio 3).
DEFAULT_STABLE_AUDIO_3_API_URL = "https://api.stability.ai/v2beta/audio"
# Credits per paid generation (1 credit = $0.01): stable-audio-2.5 is 20; stable-audio-2 is
# 17 + 0.06 x steps (about 20 at its 50 steps); stable-audio-3 is 26 per Stability's spec but 8 per its
# explainer of 2026-11-23 (unresolved: MODEL_CREDITS overrides any of them).
DEFAULT_MODEL_CREDITS: dict[str, float] = {
    "stable-audio-2.5": 20,
    "stable-audio-2": 20,
    "stable-audio-3": 26,
    # Replicate bills TangoFlux by GPU seconds, about $0.003-0.02 a job (README): one credit's
    # worth ($0.01) as the estimate until a real prediction's predict_time says otherwise.
    "tangoflux": 1,
}


def dispatch_deadline_s(job_timeout_ms: int) -> int:
    """A task's dispatch deadline: the function timeout plus Cloud Run's hold and a cold start."""
    return function_timeout_s(job_timeout_ms) + DISPATCH_ROOM_S


def dispatch_deadline_problem(job_timeout_ms: int) -> str | None:
    """Why a Cloud Tasks task could not carry this job's dispatch deadline."""
    deadline_s = dispatch_deadline_s(job_timeout_ms)
    if MIN_DISPATCH_DEADLINE_S <= deadline_s <= MAX_DISPATCH_DEADLINE_S:
        return None
    return (
        f"JOB_TIMEOUT_MS={job_timeout_ms} gives a function timeout of {function_timeout_s(job_timeout_ms)} s "
        f"and a task dispatch deadline of {deadline_s} s (with {DISPATCH_ROOM_S} s for Cloud Run's hold "
        f"and a cold start); Cloud Tasks allows {MIN_DISPATCH_DEADLINE_S} to {MAX_DISPATCH_DEADLINE_S} s "
        "(use DISPATCH=direct for longer)"
    )


def function_timeout_s(timeout_ms: int) -> int:
    """A function's --timeout: its job budget rounded up to seconds, plus the margin."""
    return math.ceil(timeout_ms / 1000) + FUNCTION_TIMEOUT_MARGIN_S


# TangoFlux on Replicate: the API's base (its token and webhook secret are in SECRET_FIELDS).
DEFAULT_REPLICATE_API_URL = "https://api.replicate.com/v1"


def replicate_token_problem(token: str) -> str | None:
    """Why a REPLICATE_API_TOKEN cannot be sent as is (never echoing it)."""
    if token.split(" ", 1)[0].lower() in ("bearer", "token"):
        return "must be the token alone, without 'Bearer ' or 'Token ' before it"
    if any(c.isspace() or c in "\"'" for c in token):
        return "must not contain spaces or quotes (was it pasted with them?)"
    return None


Dispatch = Literal["cloud_tasks", "direct"]


class JobShape(EnvironmentSettings):
    """What the functions and the webhook's trigger must agree on: the table, the job's timeout and
    how a webhook becomes a run. Declared once, read by Settings and by sona/webhook_sql.py."""

    jobs_schema: str = "public"
    jobs_table: str = "jobs"
    job_timeout_ms: int = Field(default=300_000, ge=10_000)
    # Dispatch: the webhook enqueues a Cloud Tasks task that runs the job (cloud_tasks), or the
    # webhook's own call runs it (direct, for setups without Cloud Tasks).
    dispatch: Dispatch = "cloud_tasks"

    @property
    def function_timeout_s(self) -> int:
        return function_timeout_s(self.job_timeout_ms)


class WebhookSecret(EnvironmentSettings):
    """The secret the webhook's trigger sends and the door checks (webhook-sql reads it alone)."""

    webhook_secret: SecretStr = Field(
        description="Shared secret the database webhook sends in X-Webhook-Secret"
    )


# What a deployed function serves: every entry point (the default), or only the public door, which
# in cloud_tasks mode authenticates, validates and enqueues, and so is given only the webhook secret.
FunctionRole = Literal["all", "door"]
# The keys only the code that runs jobs (or reclaims them) reads.
JOB_KEYS = ("supabase_service_role_key", "stable_audio_api_key")


class FunctionOptions(JobShape):
    """Everything a function reads from its environment but its secrets: what the deploy plan sets
    as environment variables, and checks before anything deploys (sona/deploy.py)."""

    supabase_url: str = Field(description="Supabase project URL, e.g. https://abc.supabase.co")
    function_role: FunctionRole = "all"

    # Provider.
    stable_audio_api_url: str = DEFAULT_STABLE_AUDIO_API_URL
    stable_audio_3_api_url: str = DEFAULT_STABLE_AUDIO_3_API_URL
    # Stable Audio 3 answers a generation's id at once; the attempt then asks for the audio every
    # GENERATION_POLL_MS (PERFORMANCE.md: why the wait is spent polling inside the attempt).
    generation_poll_ms: int = Field(default=2000, ge=100, le=60_000)
    # What `stats` prices each paid generation at, per model, in credits (JSON: {"stable-audio-3": 8}).
    model_credits: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MODEL_CREDITS))
    # The model for the earlier worker's modes (default, text-to-audio, audio-to-audio).
    stable_audio_model: StableAudioModel = "stable-audio-2.5"
    # One model per plug-in mode (sona/job/modes.py decides what each row asks for). The plug-in's own
    # worker served designer with TangoFlux on Replicate; Stable Audio 2.5 serves all three here.
    designer_model: ModelName = "stable-audio-2.5"
    producer_model: ModelName = "stable-audio-2.5"
    creator_model: ModelName = "stable-audio-2.5"
    # The model for a row longer than its mode's model makes (TangoFlux stops at 30 s), chosen before
    # anything is paid for; "none" (or empty): such a row fails unpaid and its tokens come back.
    designer_fallback_model: StableAudioModel | None = "stable-audio-2.5"
    producer_fallback_model: StableAudioModel | None = "stable-audio-2.5"
    creator_fallback_model: StableAudioModel | None = "stable-audio-2.5"
    # audio/* answers raw bytes; application/json answers base64 (both are handled).
    stable_audio_accept: Literal["audio/*", "application/json"] = "audio/*"
    stable_audio_cfg_scale: float | None = Field(default=None, ge=1, le=25)
    max_retries: int = Field(default=3, ge=0, le=10)
    retry_delay_ms: int = Field(default=2000, ge=0)

    # TangoFlux on Replicate (sona/engines/replicate.py; README "TangoFlux on Replicate (designer)"); its
    # token (a secret, in Settings) is needed only where an engine setting names TangoFlux.
    replicate_api_url: str = DEFAULT_REPLICATE_API_URL

    @field_validator(*FALLBACK_MODELS, mode="before")
    @classmethod
    def _no_fallback(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @field_validator("replicate_api_url")
    @classmethod
    def _replicate_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    # Jobs (the table, JOB_TIMEOUT_MS and DISPATCH are JobShape's).
    deadline_margin_ms: int = Field(default=5_000, ge=1_000)
    max_attempts: int = Field(default=3, ge=1, le=20)
    retry_backoff_cap_ms: int = Field(default=300_000, ge=0)

    # Audio and storage.
    mp3_bitrate: str = Field(default="192k", pattern=r"^\d{2,3}k$")
    # The preview at -14 LUFS with a -1 dBTP ceiling (the master is never altered); false keeps the
    # master's level (its loudness is measured and stored either way).
    preview_normalize: bool = True
    ffmpeg_binary: str | None = None
    supabase_storage_bucket: str = "audio-files"
    # Audio-to-audio inputs: private, one folder per user (its policies name it: see the migration).
    supabase_input_bucket: str = "audio-inputs"
    storage_path_prefix: str = "generated"
    # Whether a bucket the function creates is public. An existing bucket keeps its own setting and
    # is read, not changed: a private one gets signed URLs (valid STORAGE_SIGNED_URL_TTL_S).
    storage_public: bool = False
    storage_signed_url_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    # Unset: the bucket gets no limit of its own, so only the project's global upload limit applies
    # (a bucket limit above that global limit is refused by Storage when the bucket is created).
    storage_file_size_limit: str | None = None
    # The project's global upload limit (Supabase dashboard: Storage settings; the Free plan's is
    # 50MB). A row whose WAV master cannot fit under it (nor the bucket's) fails before it is paid for:
    # 16-bit 44.1 kHz stereo is 176.4 kB a second, so 50MB holds about 283 s of the 380 s
    # stable-audio-3 makes.
    storage_upload_limit: str = "50MB"

    # The Cloud Tasks queue (DISPATCH=cloud_tasks) and the worker its tasks call.
    cloud_tasks_queue: str | None = Field(
        default=None, pattern=r"^projects/[^/]+/locations/[^/]+/queues/[A-Za-z0-9-]{1,100}$"
    )
    cloud_tasks_api_url: str = "https://cloudtasks.googleapis.com"
    # The private worker (run_job) the tasks call, and the service account whose OIDC token they
    # carry: Cloud Run lets through only a token for that URL from an account with run.invoker.
    run_job_url: str | None = None
    tasks_service_account: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")
    # The queue's max_dispatches_per_second: a budget well under the provider's limit.
    provider_rate_per_s: float = Field(default=5.0, gt=0, le=PROVIDER_RATE_LIMIT_PER_S)

    # Reclaim.
    process_job_url: str | None = None
    reclaim_grace_s: int = Field(default=60, ge=0)
    # Unset: 10,000 with Cloud Tasks (enqueueing is cheap), 50 in direct mode (each holds a call).
    reclaim_batch_size: int | None = Field(default=None, ge=1, le=100_000)
    reclaim_concurrency: int = Field(default=8, ge=1, le=100)
    reclaim_timeout_ms: int | None = Field(default=None, ge=10_000)

    log_level: LogLevel = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_credits")
    @classmethod
    def _every_model_priced(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(DEFAULT_MODEL_CREDITS))
        if unknown:
            raise ValueError(
                f"names unknown models {', '.join(unknown)}; known: {', '.join(DEFAULT_MODEL_CREDITS)}"
            )
        if any(credits < 0 for credits in value.values()):
            raise ValueError("must not price a model below 0 credits")
        return {**DEFAULT_MODEL_CREDITS, **value}

    @field_validator(
        "supabase_url",
        "stable_audio_api_url",
        "stable_audio_3_api_url",
        "process_job_url",
        "cloud_tasks_api_url",
        "run_job_url",
    )
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("supabase_url")
    @classmethod
    def _project_url(cls, value: str) -> str:
        """The project's address alone (https://<ref>.supabase.co, or a local gateway): a path,
        query or missing host would make every request of every job go astray."""
        parts = urlsplit(value)
        if not parts.hostname or parts.path or parts.query or parts.fragment:
            raise ValueError("must be the project's address alone, e.g. https://<ref>.supabase.co")
        return value

    @field_validator("storage_path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if not value:
            return value
        if {".", ".."} & set(value.split("/")):
            raise ValueError("must not contain '.' or '..' segments")
        if not storage_rules.is_valid_key(value):
            raise ValueError(f"must use only characters Supabase Storage accepts in names: {_ALLOWED} /")
        _url_safe(value)
        return value

    @field_validator("supabase_storage_bucket", "supabase_input_bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not storage_rules.is_valid_bucket_name(value):
            raise ValueError(
                "must be a bucket name Supabase Storage accepts: 1 to 100 characters of "
                f"{_ALLOWED}, with no space at either end"
            )
        _url_safe(value)
        return value

    @field_validator("storage_upload_limit")
    @classmethod
    def _upload_limit(cls, value: str) -> str:
        if storage_rules.parse_file_size(value) == 0:
            raise ValueError("must be more than 0 bytes, e.g. 50MB (the Free plan's) or 500MB")
        return value

    @field_validator("storage_file_size_limit", mode="before")
    @classmethod
    def _size_limit(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None  # empty: no bucket limit
        if isinstance(value, str) and storage_rules.parse_file_size(value) == 0:
            raise ValueError("must be more than 0 bytes, or empty for no bucket limit")
        return value

    @model_validator(mode="after")
    def _within_platform_limits(self) -> FunctionOptions:
        if self.function_timeout_s > MAX_FUNCTION_TIMEOUT_S:
            raise ValueError(
                f"JOB_TIMEOUT_MS={self.job_timeout_ms} needs a function timeout of "
                f"{self.function_timeout_s} s, above Cloud Functions' {MAX_FUNCTION_TIMEOUT_S} s"
            )
        if self.deadline_margin_ms >= self.job_timeout_ms // 2:
            raise ValueError("DEADLINE_MARGIN_MS must be less than half of JOB_TIMEOUT_MS")
        if self.dispatch == "cloud_tasks":
            self._check_cloud_tasks()
        elif self.function_role == "door":
            raise ValueError(
                "FUNCTION_ROLE=door needs DISPATCH=cloud_tasks (in direct mode the door runs jobs)"
            )
        return self

    @property
    def tangoflux_modes(self) -> list[str]:
        return [m.upper() for m in PLUGIN_MODE_MODELS if getattr(self, m) == "tangoflux"]

    def _check_cloud_tasks(self) -> None:
        missing = [
            name
            for name, value in (
                ("CLOUD_TASKS_QUEUE", self.cloud_tasks_queue),
                ("RUN_JOB_URL", self.run_job_url),
                ("TASKS_SERVICE_ACCOUNT", self.tasks_service_account),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"DISPATCH=cloud_tasks (the default) needs {', '.join(missing)}; "
                "set DISPATCH=direct to let the webhook's call run the job instead"
            )
        problem = dispatch_deadline_problem(self.job_timeout_ms)
        if problem:
            raise ValueError(problem)

    @property
    def storage_file_size_limit_bytes(self) -> int | None:
        """The bucket limit in bytes, as Storage parses it (decimal units: 100MB is 10^8 bytes)."""
        limit = self.storage_file_size_limit
        return None if limit is None else storage_rules.parse_file_size(limit)

    @property
    def stored_file_limit_bytes(self) -> int:
        """The largest file an upload can store: the bucket's limit, within the project's."""
        upload = storage_rules.parse_file_size(self.storage_upload_limit)
        bucket = self.storage_file_size_limit_bytes
        return upload if bucket is None else min(upload, bucket)

    # Everything below follows from JOB_TIMEOUT_MS, the one knob (DESIGN.md, Timeouts).
    @property
    def dispatch_deadline_s(self) -> int:
        return dispatch_deadline_s(self.job_timeout_ms)

    @property
    def lease_seconds(self) -> int:
        return self.function_timeout_s + LEASE_MARGIN_S

    @property
    def job_budget_s(self) -> float:
        """How long the pipeline may run before it records its own failure."""
        return (self.job_timeout_ms - self.deadline_margin_ms) / 1000

    @property
    def reclaim_budget_s(self) -> float:
        return (self.reclaim_timeout_ms or self.job_timeout_ms) / 1000 - self.deadline_margin_ms / 1000

    @property
    def reclaim_limit(self) -> int:
        return self.reclaim_batch_size or (10_000 if self.dispatch == "cloud_tasks" else 50)

    @property
    def internal_retry_delay_s(self) -> float:
        """Backoff base for our own storage and database calls: a quarter of the provider's, since
        those recover in moments and the job's budget is better spent waiting on the provider."""
        return self.retry_delay_ms / 4000


class Settings(FunctionOptions, WebhookSecret):
    """The functions' settings: environment variables named for the fields (sona.environment),
    the options the deploy passes in the clear plus the secrets Secret Manager mounts."""

    # Required wherever jobs run (every role but the door); an empty default so a door is not
    # refused for keys it never reads, and one message per missing key otherwise.
    supabase_service_role_key: SecretStr = Field(
        default=SecretStr(""), description="Supabase service role key"
    )
    stable_audio_api_key: SecretStr = Field(default=SecretStr(""), description="Stability AI API key")
    replicate_api_token: SecretStr | None = None

    @field_validator(*JOB_KEYS)
    @classmethod
    def _job_key(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        if not value.get_secret_value():
            if info.data.get("function_role") == "door":
                return value
            raise ValueError("is required but not set")
        problem = info.field_name == "supabase_service_role_key" and key_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("replicate_api_token", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("replicate_api_token")
    @classmethod
    def _replicate_token(cls, value: SecretStr | None) -> SecretStr | None:
        problem = value and replicate_token_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _engine_secrets(self) -> Settings:
        tango = self.tangoflux_modes
        if tango and self.replicate_api_token is None and self.function_role != "door":
            raise ValueError(f"{', '.join(tango)}=tangoflux needs REPLICATE_API_TOKEN")
        return self

    @cached_property
    def secret_values(self) -> tuple[str, ...]:
        secrets = (getattr(self, name) for name in SECRET_FIELDS)
        values = (s.get_secret_value() for s in secrets if s is not None)
        return tuple(v for v in values if len(v) >= 4)

    def warnings(self) -> list[str]:
        notes = []
        if self.stable_audio_api_url.rstrip("/") == OLD_STABLE_AUDIO_API_URL:
            notes.append(
                f"STABLE_AUDIO_API_URL is the earlier worker's default {OLD_STABLE_AUDIO_API_URL}, "
                f"which is not a real route; use {DEFAULT_STABLE_AUDIO_API_URL}"
            )
        key_note = key_warning(self.supabase_service_role_key.get_secret_value())
        if key_note:
            notes.append(key_note)
        return notes


def ignored_settings(environ: Mapping[str, str], env_file: Path | None = ENV_FILE) -> list[str]:
    """One line per earlier-worker setting that is set but read by nothing (IGNORED_SETTINGS)."""
    given = set(environment_names(environ, env_file))
    return [f"{name} is ignored: {why}" for name, why in IGNORED_SETTINGS.items() if name.lower() in given]


# Storage's key characters (sona/store/storage_rules.py), for messages.
_ALLOWED = "ASCII letters, digits, space and _ ! - . * ' ( ) & $ = @ ; : + ,"


def _url_safe(value: str) -> None:
    unsafe = storage_rules.url_unsafe_part(value)
    if unsafe is not None:
        raise ValueError(f"must not contain {unsafe!r}: Storage stores it but the file URLs break")


def load_settings(**overrides: Any) -> Settings:
    """Read the function's settings; raise ConfigError listing every problem (sona.environment.load
    takes the same arguments)."""
    return load(Settings, **overrides)


__all__ = ["ConfigError", "FunctionOptions", "Settings", "load", "load_settings"]
