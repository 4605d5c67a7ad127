"""Deployment: Cloud Build and scripts/deploy.sh give the same gcloud commands, derived from the
configuration; the webhook SQL fires on INSERT with the secret header and a long enough timeout."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from devstack.database import apply_sql
from sona.config import ConfigError
from sona.ops.deploy import DEPLOYER_ROLES, RUNTIME, Plan, make_plan, not_deployed, render
from sona.ops.webhook_sql import WebhookConfig, webhook_sql
from tests import fake_gcloud
from tests.support import SECRETS, insert_job, sql

REPO = Path(__file__).resolve().parents[1]
PROJECT = "sona-test-project"


def cloudbuild() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "cloudbuild.yaml").read_text()))


# A deploy.env as an operator fills it in (deploy.env.example), for the test project.
SETTINGS = {"GOOGLE_CLOUD_PROJECT": PROJECT, "SUPABASE_URL": "https://abc.supabase.co"}


def deploy_settings(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The settings deploy.env holds: the example's, with a test's changes."""
    return {**SETTINGS, **(overrides or {})}


def write_settings(settings: dict[str, str], directory: Path) -> Path:
    path = directory / "deploy.env"
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items()))
    return path


def plan_of(settings: dict[str, str]) -> Plan:
    return make_plan(settings)


def dry_run(settings: dict[str, str], environ: dict[str, str] | None = None) -> str:
    """scripts/deploy.sh --dry-run with these settings in its deploy.env. The plan is a function of
    its settings, the environment and the checkout: a test process runs deploy.sh once for each
    such input, and the tests reading the same plan read that run's output (each run starts the
    CLI, about 0.3 CPU-s, and a dozen tests here read the example's plan)."""
    return _printed_plan(tuple(settings.items()), tuple((environ or {}).items()))


@functools.cache
def _printed_plan(settings: tuple[tuple[str, str], ...], environ: tuple[tuple[str, str], ...]) -> str:
    result = run_dry(dict(settings), dict(environ))
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_dry(
    settings: dict[str, str], environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as directory:
        base = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO),
            "DEPLOY_SETTINGS": str(write_settings(settings, Path(directory))),
        }
        return subprocess.run(
            [str(REPO / "scripts" / "deploy.sh"), "--dry-run"],
            cwd=REPO,
            env={**base, **(environ or {})},
            capture_output=True,
            text=True,
            check=False,
        )


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


def test_deploy_sh_prints_the_plan_its_settings_file_makes() -> None:
    settings = deploy_settings()
    assert dry_run(settings) == render(plan_of(settings))


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
    functions = deploys(dry_run(deploy_settings({"JOB_TIMEOUT_MS": job_timeout_ms, "DISPATCH": dispatch})))
    runs_jobs = "run-job" if dispatch == "cloud_tasks" else "process-job"
    assert flag(functions[runs_jobs], "timeout") == timeout


def test_a_timeout_above_3600_s_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="above Cloud Functions' 3600 s"):
        plan_of(deploy_settings({"JOB_TIMEOUT_MS": "3600000"}))


ALL_SECRETS = (
    "SUPABASE_SERVICE_ROLE_KEY=sona-supabase-service-role-key:latest,"
    "STABLE_AUDIO_API_KEY=sona-stable-audio-api-key:latest,"
    "WEBHOOK_SECRET=sona-webhook-secret:latest"
)


def test_secrets_come_only_from_secret_manager() -> None:
    functions = deploys(dry_run(deploy_settings()))
    for name, argv in functions.items():
        expected = "WEBHOOK_SECRET=sona-webhook-secret:latest" if name == "process-job" else ALL_SECRETS
        assert flag(argv, "set-secrets") == expected
        assert not [name for name in env_vars(argv) if re.search(r"KEY|SECRET", name)]


def test_a_settings_file_holding_a_secret_is_refused_without_echoing_it() -> None:
    """deploy.env travels in the build's upload: a secret there would travel with it."""
    result = run_dry({**deploy_settings(), "STABLE_AUDIO_API_KEY": SECRETS["stable_audio_api_key"]})
    assert result.returncode == 1
    assert "STABLE_AUDIO_API_KEY is a secret" in result.stderr
    assert SECRETS["stable_audio_api_key"] not in result.stdout + result.stderr


def test_a_mode_served_by_tangoflux_gets_its_token_from_secret_manager_too() -> None:
    functions = deploys(dry_run({**deploy_settings(), "DESIGNER_MODEL": "tangoflux"}))
    for name, argv in functions.items():
        token = ",REPLICATE_API_TOKEN=sona-replicate-api-token:latest"
        assert str(flag(argv, "set-secrets")).endswith(token) == (name != "process-job")  # the door never
        assert env_vars(argv)["DESIGNER_MODEL"] == "tangoflux"


def test_only_process_job_is_opened_to_the_public() -> None:
    """The door is deployed leaving its access as it is, then opened (allUsers, or the invoker check
    off where that is refused: tests/test_deploy_script.py runs both); the rest are private."""
    script = dry_run(deploy_settings())
    functions = deploys(script)
    assert "--allow-unauthenticated" not in functions["process-job"]
    assert "--no-allow-unauthenticated" not in functions["process-job"]
    assert "--no-allow-unauthenticated" in functions["reclaim-jobs"]
    opened = [li for li in script.splitlines() if "--member=allUsers" in li or "--no-invoker-iam-check" in li]
    assert opened and all(" process-job " in li for li in opened)


@pytest.mark.parametrize("concurrency", ["1", "2", "8"])
def test_concurrency_and_threads_follow_max_concurrent_jobs(concurrency: str) -> None:
    argv = deploys(dry_run(deploy_settings({"MAX_CONCURRENT_JOBS": concurrency})))["run-job"]
    assert flag(argv, "concurrency") == concurrency
    assert env_vars(argv)["THREADS"] == concurrency
    assert float(flag(argv, "cpu") or 0) >= 1


def test_concurrency_above_one_with_less_than_a_vcpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        plan_of(deploy_settings({"FUNCTION_CPU": "0.5", "MAX_CONCURRENT_JOBS": "2"}))


def test_every_value_an_operator_changes_is_a_setting() -> None:
    functions = deploys(
        dry_run(
            deploy_settings(
                {
                    "REGION": "europe-west1",
                    "PROCESS_JOB_FUNCTION": "pj",
                    "RUN_JOB_FUNCTION": "wj",
                    "RECLAIM_JOBS_FUNCTION": "rj",
                    "FUNCTION_MEMORY": "2Gi",
                    "MAX_INSTANCES": "3",
                    "FUNCTION_SERVICE_ACCOUNT": "run@p.iam",
                }
            )
        )
    )
    assert set(functions) == {"pj", "wj", "rj"}
    argv = functions["wj"]
    assert (
        flag(argv, "region"),
        flag(argv, "memory"),
        flag(argv, "max-instances"),
        flag(argv, "service-account"),
        flag(argv, "runtime"),
        flag(argv, "entry-point"),
    ) == ("europe-west1", "2Gi", "3", "run@p.iam", "python312", "run_job")
    assert flag(functions["pj"], "entry-point") == "process_job"
    assert flag(functions["rj"], "entry-point") == "reclaim_jobs"
    assert env_vars(argv)["GOOGLE_CLOUD_PROJECT"] == PROJECT


def test_the_scheduler_job_is_created_or_updated_with_an_oidc_token() -> None:
    script = dry_run(deploy_settings({"RECLAIM_SCHEDULE": "*/5 * * * *"}))
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
    config = WebhookConfig(job_timeout_ms=120_000, dispatch="direct")
    apply_sql(db_url, webhook_sql(config, URL, secret=SecretStr(SECRETS["webhook_secret"])))
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
    config, secret = WebhookConfig(), SecretStr("s3cret-value")
    apply_sql(
        db_url, webhook_sql(config, URL, secret=secret), webhook_sql(config, URL + "?v=2", secret=secret)
    )
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
    script = dry_run(deploy_settings())
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


# -- issue 31: one source of settings, checked before anything deploys ----------------------------


def test_the_plan_refuses_to_run_without_its_settings_file(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "DEPLOY_SETTINGS": str(tmp_path / "deploy.env"),
    }
    result = subprocess.run(
        [str(REPO / "scripts" / "deploy.sh"), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "deploy.env not found" in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"JOB_TIMEOUT_MS": "60000"}, "JOB_TIMEOUT_MS is set in the environment but"),
        ({"GOOGLE_CLOUD_PROJECT": "another-project"}, "GOOGLE_CLOUD_PROJECT is set in the environment but"),
        ({"DESIGNER_MODEL": "tangoflux"}, "DESIGNER_MODEL is set in the environment but"),
    ],
    ids=["a shell export", "the build's own project", "a mode's engine"],
)
def test_a_setting_only_the_environment_gives_is_refused(environ: dict[str, str], says: str) -> None:
    """Cloud Build reads only deploy.env: a setting from a shell export would be dropped by the next
    build (--set-env-vars replaces everything), so neither path takes it."""
    result = run_dry(deploy_settings(), environ)
    assert result.returncode == 1
    assert says in result.stderr


def test_the_same_value_in_the_environment_and_the_file_is_fine() -> None:
    assert run_dry(deploy_settings(), {"GOOGLE_CLOUD_PROJECT": PROJECT}).returncode == 0


def test_a_local_env_setting_the_deploy_lacks_is_named(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "DESIGNER_MODEL=tangoflux\nREGION=europe-west1\nSUPABASE_URL=https://abc.supabase.co\n"
    )
    notes = not_deployed(plan_of(deploy_settings()).env, tmp_path / ".env")
    assert notes == [
        "DESIGNER_MODEL from " + str(tmp_path / ".env") + " is not deployed: deploy.env does not set it"
    ]


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("SUPABASE_URL", "", "SUPABASE_URL must start with http"),
        ("SUPABASE_URL", "abc.supabase.co", "SUPABASE_URL must start with http"),
        ("SUPABASE_URL", "https://", "SUPABASE_URL must be the project's address alone"),
        (
            "SUPABASE_URL",
            "https://abc.supabase.co/rest/v1",
            "SUPABASE_URL must be the project's address alone",
        ),
        ("GOOGLE_CLOUD_PROJECT", "", "GOOGLE_CLOUD_PROJECT must be a project id"),
        ("MP3_BITRATE", "loud", "MP3_BITRATE"),
        ("DESIGNER_MODEL", "stable-audio-9", "DESIGNER_MODEL"),
        ("STORAGE_PATH_PREFIX", "a/../b", "STORAGE_PATH_PREFIX must not contain '.' or '..'"),
        ("DEADLINE_MARGIN_MS", "200000", "DEADLINE_MARGIN_MS must be less than half"),
        ("DOOR_MAX_INSTANCES", "1", "cannot take a pg_net batch of 200"),
    ],
)
def test_the_plan_refuses_what_a_function_would_refuse_at_start(setting: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        plan_of(deploy_settings({setting: value}))


def test_every_problem_of_the_plan_and_the_functions_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        plan_of(deploy_settings({"SUPABASE_URL": "", "GOOGLE_CLOUD_PROJECT": "", "MP3_BITRATE": "loud"}))
    assert len(caught.value.problems) == 3


# -- the door and the worker ----------------------------------------------------------------------


def sizes(argv: list[str]) -> dict[str, str | None]:
    return {f: flag(argv, f) for f in ("timeout", "memory", "concurrency", "max-instances")}


def test_the_door_is_sized_for_pg_nets_batch_and_the_worker_for_its_jobs() -> None:
    functions = deploys(dry_run(deploy_settings()))
    door, worker = functions["process-job"], functions["run-job"]
    assert sizes(door) == {"timeout": "30s", "memory": "512Mi", "concurrency": "80", "max-instances": "5"}
    assert sizes(worker) == {"timeout": "310s", "memory": "1Gi", "concurrency": "2", "max-instances": "10"}
    assert int(flag(door, "concurrency") or 0) * int(flag(door, "max-instances") or 0) >= 200
    assert env_vars(door)["THREADS"] == "80"
    assert env_vars(door)["FUNCTION_ROLE"] == "door" and "FUNCTION_ROLE" not in env_vars(worker)


def test_in_direct_mode_the_door_runs_jobs_and_is_sized_and_armed_like_the_worker() -> None:
    door = deploys(dry_run(deploy_settings({"DISPATCH": "direct"})))["process-job"]
    assert sizes(door) == {"timeout": "310s", "memory": "1Gi", "concurrency": "2", "max-instances": "10"}
    assert flag(door, "set-secrets") == ALL_SECRETS and "FUNCTION_ROLE" not in env_vars(door)


def test_every_deploy_serves_its_new_revision() -> None:
    for argv in deploys(dry_run(deploy_settings())).values():
        assert "--serve-all-traffic-latest-revision" in argv


def test_a_dollar_in_a_setting_reaches_every_function_as_written() -> None:
    functions = deploys(dry_run(deploy_settings({"STORAGE_PATH_PREFIX": "gen$HOME"})))
    assert {env_vars(argv)["STORAGE_PATH_PREFIX"] for argv in functions.values()} == {"gen$HOME"}
    reclaim = env_vars(functions["reclaim-jobs"])
    assert reclaim["PROCESS_JOB_URL"] == "${PROCESS_JOB_URL}"  # the one the shell expands


def test_the_functions_account_may_list_the_queue_it_enqueues_into() -> None:
    script = dry_run(deploy_settings())
    roles = re.findall(r"gcloud tasks queues add-iam-policy-binding sona-jobs .*--role=(\S+)", script)
    assert sorted(roles) == ["roles/cloudtasks.enqueuer", "roles/cloudtasks.viewer"]


# -- who deploys ----------------------------------------------------------------------------------


def gcloud_groups(script: str) -> set[tuple[str, ...]]:
    """Each gcloud command of the plan, by the group DEPLOYER_ROLES keys it under."""
    groups = set()
    for argv in (shlex.split(m) for m in re.findall(r"gcloud ((?:[a-z-]+ ?)+)", script)):
        key = next(k for k in [tuple(argv[:2]), tuple(argv[:1])] if k in DEPLOYER_ROLES or len(k) == 1)
        groups.add(key)
    return groups


def test_every_command_of_the_plan_has_its_role_for_the_deploy_account() -> None:
    for dispatch in ("cloud_tasks", "direct"):
        assert gcloud_groups(dry_run(deploy_settings({"DISPATCH": dispatch}))) <= set(DEPLOYER_ROLES)


def test_the_build_deploys_as_its_own_account_with_its_logs_in_cloud_logging() -> None:
    build = cloudbuild()
    assert build["serviceAccount"] == (
        "projects/$PROJECT_ID/serviceAccounts/sona-deployer@$PROJECT_ID.iam.gserviceaccount.com"
    )
    assert build["options"]["logging"] == "CLOUD_LOGGING_ONLY"  # required with a user-named account


def test_deployment_md_grants_the_deploy_account_exactly_the_roles_the_plan_uses() -> None:
    text = (REPO / "DEPLOYMENT.md").read_text()
    block = text[text.index("<!-- deployer roles") : text.index("<!-- end of deployer roles -->")]
    granted = set(re.findall(r"roles/[\w.]+", block))
    needed = set(DEPLOYER_ROLES.values()) | {"roles/logging.logWriter", "roles/iam.serviceAccountUser"}
    assert granted == needed


def test_an_empty_setting_is_deployed_empty_not_dropped_for_its_default() -> None:
    """STORAGE_FILE_SIZE_LIMIT= means no bucket limit: dropping it would deploy the same (unset), but
    other empties mean something the default does not, so every setting the file names is passed."""
    functions = deploys(dry_run(deploy_settings({"STORAGE_FILE_SIZE_LIMIT": ""})))
    assert {env_vars(argv).get("STORAGE_FILE_SIZE_LIMIT") for argv in functions.values()} == {""}
