"""Deployment: Cloud Build and scripts/deploy.sh give the same gcloud commands, derived from the
configuration; the webhook SQL fires on INSERT with the secret header and a long enough timeout."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.database import apply_sql
from sona.config import ConfigError, load
from sona.ops.deploy import RUNTIME, DeployConfig, render
from sona.ops.webhook_sql import WebhookConfig, webhook_sql
from tests import fake_gcloud
from tests.support import SECRETS, insert_job, sql

REPO = Path(__file__).resolve().parents[1]
PROJECT = "sona-test-project"


def cloudbuild() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "cloudbuild.yaml").read_text()))


def cloudbuild_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The plan step's environment, with Cloud Build's substitutions applied."""
    build = cloudbuild()
    values = {**build["substitutions"], "_SUPABASE_URL": "https://abc.supabase.co", **(overrides or {})}
    (plan,) = [s for s in build["steps"] if s["id"] == "plan"]
    env = {}
    for item in plan["env"]:
        name, _, value = item.partition("=")
        value = value.replace("$PROJECT_ID", PROJECT)
        env[name] = re.sub(r"\$(_[A-Z_]+)", lambda m: str(values[m.group(1)]), value)
    return env


def dry_run(env: dict[str, str]) -> str:
    base = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [str(REPO / "scripts" / "deploy.sh"), "--dry-run"],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def deploys(script: str) -> dict[str, list[str]]:
    """The argv of each `gcloud functions deploy NAME ...` line, by function name."""
    found = {}
    for line in script.splitlines():
        if line.startswith("gcloud functions deploy "):
            argv = shlex.split(line)
            found[argv[3]] = argv
    return found


def flag(argv: list[str], name: str) -> str | None:
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def env_vars(argv: list[str]) -> dict[str, str]:
    """--set-env-vars as gcloud splits it (tests/fake_gcloud.py: `^D^` picks the delimiter)."""
    return fake_gcloud.env_vars(flag(argv, "set-env-vars") or "")


def test_cloud_build_and_deploy_sh_give_the_same_commands() -> None:
    env = cloudbuild_env()
    assert dry_run(env) == render(
        load(DeployConfig, env_file=None, **{k.lower(): v for k, v in env.items()}), env
    )


def must_finish_before(step_id: str) -> set[str]:
    """Every step that Cloud Build completes successfully before it starts step_id: those named in
    its waitFor, or all earlier ones when it has none; `-` alone means none (the build's start)."""
    steps = cloudbuild()["steps"]
    ids = [s["id"] for s in steps]
    step = steps[ids.index(step_id)]
    direct = [i for i in step.get("waitFor") or ids[: ids.index(step_id)] if i != "-"]
    return set(direct).union(*(must_finish_before(i) for i in direct))


def test_cloud_build_runs_the_tests_before_it_deploys() -> None:
    steps = [s["id"] for s in cloudbuild()["steps"]]
    assert steps == ["test", "audit", "plan", "deploy"]
    (test,) = [s for s in cloudbuild()["steps"] if s["id"] == "test"]
    assert test["args"] == ["scripts/run.py", "test"]
    assert "test" in must_finish_before("deploy")


def test_cloud_build_audits_the_locked_dependencies_before_it_deploys() -> None:
    (audit,) = [s for s in cloudbuild()["steps"] if s["id"] == "audit"]
    assert [audit["entrypoint"], *audit["args"][:2]] == [".venv/bin/python", "-m", "pip_audit"]
    assert {"--requirement=requirements.txt", "--require-hashes", "--strict"} <= set(audit["args"])
    assert "test" in must_finish_before("audit")  # the test step makes .venv, with pip-audit pinned
    assert "audit" in must_finish_before("deploy")


def test_the_audit_reads_the_lock_as_the_deployed_python_installs_it() -> None:
    """pip-audit evaluates the lock's environment markers with its own Python."""
    (audit,) = [s for s in cloudbuild()["steps"] if s["id"] == "audit"]
    runtime = re.fullmatch(r"python3(\d+)", RUNTIME)
    assert runtime is not None
    assert audit["name"] == f"python:3.{runtime[1]}"


@pytest.mark.parametrize(
    ("job_timeout_ms", "dispatch", "timeout"),
    [("300000", "cloud_tasks", "310s"), ("60500", "cloud_tasks", "71s"), ("3590000", "direct", "3600s")],
)
def test_timeout_follows_job_timeout_ms(job_timeout_ms: str, dispatch: str, timeout: str) -> None:
    functions = deploys(dry_run(cloudbuild_env({"_JOB_TIMEOUT_MS": job_timeout_ms, "_DISPATCH": dispatch})))
    assert flag(functions["process-job"], "timeout") == timeout


def test_a_timeout_above_3600_s_is_a_clear_error() -> None:
    env = cloudbuild_env({"_JOB_TIMEOUT_MS": "3600000"})
    with pytest.raises(ConfigError, match="above Cloud Functions' 3600 s limit"):
        load(DeployConfig, env_file=None, **{k.lower(): v for k, v in env.items()})


def test_secrets_come_only_from_secret_manager() -> None:
    env = {
        **cloudbuild_env(),
        "SUPABASE_SERVICE_ROLE_KEY": SECRETS["supabase_service_role_key"],
        "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"],
        "WEBHOOK_SECRET": SECRETS["webhook_secret"],
    }
    script = dry_run(env)
    assert not any(secret in script for secret in SECRETS.values())
    for argv in deploys(script).values():
        assert flag(argv, "set-secrets") == (
            "SUPABASE_SERVICE_ROLE_KEY=sona-supabase-service-role-key:latest,"
            "STABLE_AUDIO_API_KEY=sona-stable-audio-api-key:latest,"
            "WEBHOOK_SECRET=sona-webhook-secret:latest"
        )
        assert not [name for name in env_vars(argv) if re.search(r"KEY|SECRET", name)]


def test_a_mode_served_by_tangoflux_gets_its_token_from_secret_manager_too() -> None:
    script = dry_run(
        {**cloudbuild_env(), "DESIGNER_MODEL": "tangoflux", "REPLICATE_API_TOKEN": "r8_sentinel"}
    )
    assert "r8_sentinel" not in script
    for argv in deploys(script).values():
        assert str(flag(argv, "set-secrets")).endswith(",REPLICATE_API_TOKEN=sona-replicate-api-token:latest")
        assert env_vars(argv)["DESIGNER_MODEL"] == "tangoflux"


def test_only_process_job_is_opened_to_the_public() -> None:
    """The door is deployed leaving its access as it is, then opened (allUsers, or the invoker check
    off where that is refused: tests/test_deploy_script.py runs both); the rest are private."""
    script = dry_run(cloudbuild_env())
    functions = deploys(script)
    assert "--allow-unauthenticated" not in functions["process-job"]
    assert "--no-allow-unauthenticated" not in functions["process-job"]
    assert "--no-allow-unauthenticated" in functions["reclaim-jobs"]
    opened = [li for li in script.splitlines() if "--member=allUsers" in li or "--no-invoker-iam-check" in li]
    assert opened and all(" process-job " in li for li in opened)


@pytest.mark.parametrize("concurrency", ["1", "2", "8"])
def test_concurrency_and_threads_follow_max_concurrent_jobs(concurrency: str) -> None:
    argv = deploys(dry_run(cloudbuild_env({"_MAX_CONCURRENT_JOBS": concurrency})))["process-job"]
    assert flag(argv, "concurrency") == concurrency
    assert env_vars(argv)["THREADS"] == concurrency
    assert float(flag(argv, "cpu") or 0) >= 1


def test_concurrency_above_one_with_less_than_a_vcpu_is_refused() -> None:
    env = cloudbuild_env({"_FUNCTION_CPU": "0.5", "_MAX_CONCURRENT_JOBS": "2"})
    with pytest.raises(ConfigError, match="at least 1"):
        load(DeployConfig, env_file=None, **{k.lower(): v for k, v in env.items()})


def test_every_value_an_operator_changes_is_a_substitution() -> None:
    functions = deploys(
        dry_run(
            cloudbuild_env(
                {
                    "_REGION": "europe-west1",
                    "_PROCESS_JOB_FUNCTION": "pj",
                    "_RUN_JOB_FUNCTION": "wj",
                    "_RECLAIM_JOBS_FUNCTION": "rj",
                    "_FUNCTION_MEMORY": "2Gi",
                    "_MAX_INSTANCES": "3",
                    "_FUNCTION_SERVICE_ACCOUNT": "run@p.iam",
                }
            )
        )
    )
    assert set(functions) == {"pj", "wj", "rj"}
    argv = functions["pj"]
    assert (
        flag(argv, "region"),
        flag(argv, "memory"),
        flag(argv, "max-instances"),
        flag(argv, "service-account"),
        flag(argv, "runtime"),
        flag(argv, "entry-point"),
    ) == ("europe-west1", "2Gi", "3", "run@p.iam", "python312", "process_job")
    assert flag(functions["rj"], "entry-point") == "reclaim_jobs"
    assert env_vars(argv)["GOOGLE_CLOUD_PROJECT"] == PROJECT


def test_the_scheduler_job_is_created_or_updated_with_an_oidc_token() -> None:
    script = dry_run(cloudbuild_env({"_RECLAIM_SCHEDULE": "*/5 * * * *"}))
    assert "gcloud scheduler jobs describe sona-reclaim-jobs" in script
    for verb in ("update", "create"):
        line = next(li for li in script.splitlines() if f"gcloud scheduler jobs {verb} http" in li)
        argv = shlex.split(line)
        assert flag(argv, "schedule") == "*/5 * * * *"
        assert flag(argv, "oidc-service-account-email") == f"sona-scheduler@{PROJECT}.iam.gserviceaccount.com"


# -- the webhook SQL ------------------------------------------------------------------------------

URL = "https://us-central1-p.cloudfunctions.net/process-job"
# pg_net's queue, the body as the JSON it carries.
QUEUED = """select url, method, headers, timeout_milliseconds, convert_from(body, 'UTF8')::jsonb as body
  from net.http_request_queue order by id"""


def test_the_webhook_fires_on_insert_with_url_method_secret_and_timeout(db_url: str) -> None:
    config = WebhookConfig(
        webhook_secret=SECRETS["webhook_secret"],  # type: ignore[call-arg]
        job_timeout_ms=120_000,
        dispatch="direct",
    )
    apply_sql(db_url, webhook_sql(config, URL))
    job_id = insert_job(db_url)
    (call,) = sql(db_url, QUEUED, role=None)
    assert (call["url"], call["method"]) == (URL, "POST")
    assert call["headers"] == {
        "Content-Type": "application/json",
        "X-Webhook-Secret": SECRETS["webhook_secret"],
    }
    assert call["timeout_milliseconds"] >= 120_000
    assert call["body"]["record"]["id"] == str(job_id)
    assert (call["body"]["type"], call["body"]["table"]) == ("INSERT", "jobs")


def test_installing_the_webhook_twice_leaves_one_trigger(db_url: str) -> None:
    config = WebhookConfig(webhook_secret="s3cret-value")
    apply_sql(db_url, webhook_sql(config, URL), webhook_sql(config, URL + "?v=2"))
    insert_job(db_url)
    calls = sql(db_url, QUEUED, role=None)
    assert [c["url"] for c in calls] == [URL + "?v=2"]


# Supabase Vault's view, for this test only; net.http_post is the pg_net stand-in every database has.
VAULT_STAND_IN = """
create schema if not exists vault;
create table if not exists vault.decrypted_secrets (name text primary key, decrypted_secret text);
"""


def test_the_vault_webhook_reads_the_secret_at_send_time(private_db_url: str) -> None:
    apply_sql(
        private_db_url,
        VAULT_STAND_IN,
        "insert into vault.decrypted_secrets values ('sona_webhook_secret', 'from-the-vault')",
    )
    config = WebhookConfig(job_timeout_ms=60_000, dispatch="direct")
    script = webhook_sql(config, URL, vault_secret="sona_webhook_secret")
    assert "from-the-vault" not in script
    apply_sql(private_db_url, script)
    job_id = insert_job(private_db_url)
    (call,) = sql(private_db_url, QUEUED, role=None)
    assert call["headers"]["X-Webhook-Secret"] == "from-the-vault"
    assert call["timeout_milliseconds"] >= 60_000
    assert (call["url"], call["body"]["record"]["id"]) == (URL, str(job_id))


def test_the_webhook_sql_command_prints_the_trigger(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "WEBHOOK_SECRET": "cli-secret",
        "JOB_TIMEOUT_MS": "90000",
        "DISPATCH": "direct",
    }
    result = subprocess.run(
        [sys.executable, "-m", "sona", "webhook-sql", "--url", URL],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "create or replace trigger sona_process_job" in result.stdout
    assert "'100000'" in result.stdout  # the function's timeout: 90 s + 10 s margin


def test_the_plan_counts_pauses_in_a_log_based_metric_and_alerts_on_it_once() -> None:
    script = dry_run(cloudbuild_env())
    lines = script.splitlines()
    assert "gcloud logging metrics describe sona_service_paused" in script
    for verb in ("update", "create"):
        line = next(li for li in lines if f"gcloud logging metrics {verb} sona_service_paused" in li)
        log_filter = flag(shlex.split(line.strip()), "log-filter") or ""
        assert 'jsonPayload.code="sona_service_paused"' in log_filter
        assert "severity>=ERROR" in log_filter
    found = next(li for li in lines if "gcloud monitoring policies list" in li)
    assert found.startswith('SONA_POLICY="$(') and 'displayName="Sona service paused"' in found
    create = next(li for li in lines if "gcloud monitoring policies create" in li)
    assert create.strip().startswith("sona_retry_new_metric gcloud")  # waits while the metric is new
    policy = json.loads(flag(shlex.split(create.strip()), "policy") or "{}")
    (condition,) = policy["conditions"]
    assert (
        'metric.type="logging.googleapis.com/user/sona_service_paused"'
        in condition["conditionThreshold"]["filter"]
    )
    assert policy["displayName"] == "Sona service paused"
