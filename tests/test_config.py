"""Configuration: every problem at once, no secret ever printed, everything derived from JOB_TIMEOUT_MS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.emulators.gateway import make_jwt
from sona.config import (
    DEFAULT_STABLE_AUDIO_API_URL,
    OLD_STABLE_AUDIO_API_URL,
    ConfigError,
    Settings,
    load_settings,
)
from sona.ops.webhook_sql import WebhookConfig
from tests.support import SECRETS, make_settings

REPO = Path(__file__).resolve().parents[1]


def test_defaults_keep_the_earlier_workers_names_and_values() -> None:
    s = make_settings()
    assert s.job_timeout_ms == 300_000
    assert (s.supabase_storage_bucket, s.storage_path_prefix) == ("audio-files", "generated")
    assert (s.max_retries, s.retry_delay_ms, s.log_level) == (3, 2000, "info")
    assert s.stable_audio_api_url == DEFAULT_STABLE_AUDIO_API_URL
    assert s.stable_audio_model == "stable-audio-2.5"


def test_timeouts_follow_job_timeout_ms() -> None:
    s = make_settings(job_timeout_ms=60_500)
    assert s.function_timeout_s == 61 + 10  # rounded up, plus the margin
    assert s.lease_seconds > s.function_timeout_s  # the lease outlives the invocation
    assert s.job_budget_s < 60.5  # the job records its own failure before the platform kills it
    direct = WebhookConfig(job_timeout_ms=60_500, dispatch="direct")
    assert direct.timeout_ms >= 60_500


def test_a_timeout_above_cloud_functions_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="3600"):
        make_settings(job_timeout_ms=3_595_000)


def test_all_problems_are_reported_at_once_without_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "STABLE_AUDIO_API_KEY", "WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings(
            env_file=None,
            supabase_url="ftp://x",
            job_timeout_ms=5,
            webhook_secret=SECRETS["webhook_secret"],
            mp3_bitrate="loud",
        )
    text = str(caught.value)
    for expected in (
        "SUPABASE_URL must start with http",
        "SUPABASE_SERVICE_ROLE_KEY is required",
        "STABLE_AUDIO_API_KEY is required",
        "JOB_TIMEOUT_MS",
        "MP3_BITRATE",
    ):
        assert expected in text
    assert len(caught.value.problems) == 5
    assert SECRETS["webhook_secret"] not in text


def test_the_old_provider_url_gets_a_warning() -> None:
    s = make_settings(stable_audio_api_url=OLD_STABLE_AUDIO_API_URL)
    assert any("not a real route" in w for w in s.warnings())
    assert make_settings().warnings() == []


def test_secrets_do_not_show_in_repr() -> None:
    text = repr(make_settings())
    assert not any(secret in text for secret in SECRETS.values())


def run_validate(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run(
        [sys.executable, "-m", "sona", "validate"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**base, "PYTHONPATH": str(REPO), **env},
        check=False,
    )


def test_validate_command_lists_every_problem_and_no_secret(tmp_path: Path) -> None:
    result = run_validate(
        {
            "SUPABASE_SERVICE_ROLE_KEY": SECRETS["supabase_service_role_key"],
            "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
            "JOB_TIMEOUT_MS": "999",
            "MAX_RETRIES": "many",
        },
        tmp_path,
    )
    assert result.returncode == 1
    out = result.stdout + result.stderr
    for expected in (
        "SUPABASE_URL is required",
        "WEBHOOK_SECRET is required",
        "JOB_TIMEOUT_MS",
        "MAX_RETRIES",
    ):
        assert expected in out
    assert not any(secret in out for secret in SECRETS.values())


def test_validate_command_passes_a_good_environment_and_reads_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"WEBHOOK_SECRET={SECRETS['webhook_secret']}\n")
    result = run_validate(
        {
            "SUPABASE_URL": "https://abc.supabase.co",
            "SUPABASE_SERVICE_ROLE_KEY": SECRETS["supabase_service_role_key"],
            "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
            "STABLE_AUDIO_API_URL": OLD_STABLE_AUDIO_API_URL,
            "DISPATCH": "direct",
        },
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Configuration is valid" in result.stdout
    assert "not a real route" in result.stderr


def test_the_earlier_workers_dead_settings_still_validate_and_are_named_as_ignored(tmp_path: Path) -> None:
    """POLL_INTERVAL_MS (the README promises the earlier worker's .env still validates) and
    REPLICATE_WEBHOOK_SECRET (whose whsec_ check went with it) are read by nothing: validate says so
    once each, and still passes, whatever their value."""
    result = run_validate(
        {
            "SUPABASE_URL": "https://abc.supabase.co",
            "SUPABASE_SERVICE_ROLE_KEY": SECRETS["supabase_service_role_key"],
            "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
            "WEBHOOK_SECRET": SECRETS["webhook_secret"],
            "DISPATCH": "direct",
            "POLL_INTERVAL_MS": "5000",
            "REPLICATE_WEBHOOK_SECRET": "not-a-whsec-key",
        },
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "warning: POLL_INTERVAL_MS is ignored: the webhook replaced polling" in result.stderr
    assert "warning: REPLICATE_WEBHOOK_SECRET is ignored" in result.stderr
    assert "not-a-whsec-key" not in result.stderr


def test_each_setting_is_declared_once() -> None:
    """The functions, the deploy plan and the webhook's trigger read one declaration of each
    variable: Settings from JobShape, FunctionOptions and WebhookSecret; the plan and the trigger
    from the same classes, never a copy."""
    from sona.config import FunctionOptions, JobShape, WebhookSecret
    from sona.ops.deploy import DeployConfig

    declared: dict[str, list[str]] = {}
    for model in (JobShape, WebhookSecret, FunctionOptions, Settings, DeployConfig, WebhookConfig):
        own = set(model.model_fields) - {
            n for base in model.__mro__[1:] for n in getattr(base, "model_fields", {})
        }
        for name in own:
            declared.setdefault(name, []).append(model.__name__)
    assert {name: models for name, models in declared.items() if len(models) > 1} == {}


def test_dead_settings_are_gone() -> None:
    assert not {"poll_interval_ms", "replicate_webhook_secret", "max_concurrent_jobs"} & set(
        Settings.model_fields
    )


def test_validate_command_reports_an_ffmpeg_that_does_not_exist(tmp_path: Path) -> None:
    result = run_validate(
        {
            "SUPABASE_URL": "https://abc.supabase.co",
            "SUPABASE_SERVICE_ROLE_KEY": SECRETS["supabase_service_role_key"],
            "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
            "WEBHOOK_SECRET": SECRETS["webhook_secret"],
            "FFMPEG_BINARY": "/no/ffmpeg",
            "DISPATCH": "direct",
        },
        tmp_path,
    )
    assert result.returncode == 1
    assert "FFMPEG_BINARY=/no/ffmpeg is not an executable ffmpeg" in result.stderr


GOOD_ENV = {
    "SUPABASE_URL": "https://abc.supabase.co",
    "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
    "WEBHOOK_SECRET": SECRETS["webhook_secret"],
    "DISPATCH": "direct",
}


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("sb_publishable_ACJWlzQHlZjBrEguHvfOxg_3BJgxAaH", "is a publishable key"),
        (make_jwt("a-jwt-secret", "anon"), "is a legacy JWT with role 'anon'"),
    ],
)
def test_validate_refuses_an_anon_or_publishable_key_and_says_why(
    tmp_path: Path, key: str, says: str
) -> None:
    result = run_validate({**GOOD_ENV, "SUPABASE_SERVICE_ROLE_KEY": key}, tmp_path)
    assert result.returncode == 1
    assert f"SUPABASE_SERVICE_ROLE_KEY {says}" in result.stderr
    assert "row level security" in result.stderr
    assert key not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("key", "warned"),
    [("an-opaque-key-of-no-known-shape", True), ("sb_secret_N7UND0UgjKTVK-Uodkm0Hg", False)],
)
def test_validate_passes_a_key_of_unknown_shape_with_a_warning(
    tmp_path: Path, key: str, warned: bool
) -> None:
    result = run_validate({**GOOD_ENV, "SUPABASE_SERVICE_ROLE_KEY": key}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("neither a secret key" in result.stderr) == warned
    assert key not in result.stdout + result.stderr


def test_the_bucket_gets_no_size_limit_of_its_own_by_default() -> None:
    s = make_settings()
    assert (s.storage_file_size_limit, s.storage_file_size_limit_bytes) == (None, None)
    assert make_settings(storage_file_size_limit="").storage_file_size_limit_bytes is None


@pytest.mark.parametrize(
    ("setting", "size"),
    [
        ("100MB", 100_000_000),  # decimal, as Storage parses it: not 100 MiB
        ("50mb", 50_000_000),
        ("1.5GB", 1_500_000_000),
        ("2KB", 2_000),
        ("1234567B", 1_230_000),  # Storage keeps 3 significant digits
    ],
)
def test_a_bucket_size_limit_is_read_as_storage_reads_it(setting: str, size: int) -> None:
    assert make_settings(storage_file_size_limit=setting).storage_file_size_limit_bytes == size


@pytest.mark.parametrize("setting", ["100 MB", "100", "100MiB", "1e3MB", ".5GB", "0MB"])
def test_a_bucket_size_limit_storage_would_refuse_is_a_configuration_problem(setting: str) -> None:
    with pytest.raises(ConfigError, match="STORAGE_FILE_SIZE_LIMIT"):
        make_settings(storage_file_size_limit=setting)


@pytest.mark.parametrize(
    "prefix",
    [
        "tracks/ünïcode",  # Storage refuses non-ASCII names (InvalidKey)
        "tracks#1",
        "a\\b",
        "take%20one",
        "tracks/[mix]",
        "what?",  # Storage stores these three, but the file URLs break
        "a//b",
        "a/./b",
    ],
)
def test_a_path_prefix_storage_or_urls_cannot_carry_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="STORAGE_PATH_PREFIX"):
        make_settings(storage_path_prefix=prefix)


@pytest.mark.parametrize("prefix", ["generated", "my takes (v2)/2026", "a-b_c.d/e+f,g;h:i@j=k&l$m!n*o'p"])
def test_a_path_prefix_storage_accepts_is_kept(prefix: str) -> None:
    assert make_settings(storage_path_prefix=f"/{prefix}/").storage_path_prefix == prefix


@pytest.mark.parametrize("bucket", ["audio/files", " audio", "audio?", "äudio", "a" * 101, ""])
def test_a_bucket_name_storage_would_refuse_is_a_configuration_problem(bucket: str) -> None:
    with pytest.raises(ConfigError, match="SUPABASE_STORAGE_BUCKET"):
        make_settings(supabase_storage_bucket=bucket)


def test_a_problem_of_several_settings_is_listed_in_its_own_words() -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(job_timeout_ms=10_000, deadline_margin_ms=6_000)
    assert "  - DEADLINE_MARGIN_MS must be less than half of JOB_TIMEOUT_MS" in str(caught.value)


def test_model_credits_from_the_environment_price_one_model_and_keep_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODEL_CREDITS", '{"stable-audio-3": 8}')
    settings = make_settings()
    assert settings.model_credits == {
        "stable-audio-2.5": 20,
        "stable-audio-2": 20,
        "stable-audio-3": 8,
        "tangoflux": 1,
    }


def test_model_credits_naming_an_unknown_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="MODEL_CREDITS names unknown models stable-audio-9"):
        make_settings(model_credits={"stable-audio-9": 1})


def test_stable_audio_3_can_serve_any_mode() -> None:
    settings = make_settings(designer_model="stable-audio-3", stable_audio_model="stable-audio-3")
    assert (settings.designer_model, settings.stable_audio_model) == ("stable-audio-3", "stable-audio-3")
