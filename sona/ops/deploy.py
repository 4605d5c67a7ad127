"""The one source of truth for deployment: the exact gcloud commands, derived from the configuration.

`scripts/deploy.sh` runs (or with --dry-run prints) them; Cloud Build runs the same script, so the
two paths cannot drift.
"""

from __future__ import annotations

import re
import shlex
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sona.config import (
    LEASE_MARGIN_S,
    MAX_FUNCTION_TIMEOUT_S,
    PLUGIN_MODE_MODELS,
    PROVIDER_RATE_LIMIT_PER_S,
    SECRET_FIELDS,
    Settings,
    dispatch_deadline_problem,
    function_timeout_s,
)
from sona.environment import EnvironmentSettings
from sona.ops.monitoring import HELPERS, monitoring_commands
from sona.task_queue import QueueLimits

RUNTIME = "python312"
# Cloud Scheduler waits at most 30 minutes for an HTTP target.
MAX_SCHEDULER_DEADLINE_S = 1800
# A Cloud Tasks queue allows at most 5,000 concurrent dispatches and 500 dispatches a second.
MAX_CONCURRENT_DISPATCHES = 5000


class DeployConfig(EnvironmentSettings):
    """What an operator sets to deploy: Google Cloud names plus the function's own settings."""

    google_cloud_project: str
    region: str = "us-central1"
    process_job_function: str = "process-job"
    run_job_function: str = "run-job"
    reclaim_jobs_function: str = "reclaim-jobs"
    scheduler_job: str = "sona-reclaim-jobs"
    reclaim_schedule: str = "*/2 * * * *"
    function_service_account: str = ""
    scheduler_service_account: str = ""
    # The account whose OIDC token every task carries to run_job (see tasks_account).
    tasks_service_account: str = ""
    # The account Cloud Build builds the functions as (see build_account).
    build_service_account: str = ""
    # Monitoring notification channels the pause alert notifies, comma-separated resource names
    # (projects/P/notificationChannels/ID); DEPLOYMENT.md shows how to make an email channel.
    alert_notification_channels: str = ""
    function_memory: str = "1Gi"
    function_cpu: float = Field(default=1, gt=0)
    max_instances: int = Field(default=10, ge=1)
    # Secret Manager secret names (never values).
    supabase_service_role_key_secret: str = "sona-supabase-service-role-key"  # noqa: S105
    stable_audio_api_key_secret: str = "sona-stable-audio-api-key"  # noqa: S105
    webhook_secret_secret: str = "sona-webhook-secret"  # noqa: S105
    # Only where a mode is served by TangoFlux (DESIGNER_MODEL=tangoflux, ...).
    replicate_api_token_secret: str = "sona-replicate-api-token"  # noqa: S105

    # Cloud Tasks: the queue that runs jobs, and its limits.
    dispatch: Literal["cloud_tasks", "direct"] = "cloud_tasks"
    tasks_queue: str = "sona-jobs"
    provider_rate_per_s: float = Field(default=5.0, gt=0, le=PROVIDER_RATE_LIMIT_PER_S)
    max_attempts: int = Field(default=3, ge=1, le=20)

    # The function's non-secret settings that shape the deployment.
    supabase_url: str
    job_timeout_ms: int = Field(default=300_000, ge=10_000)
    reclaim_timeout_ms: int | None = Field(default=None, ge=10_000)
    max_concurrent_jobs: int = Field(default=2, ge=1, le=1000)

    @field_validator(
        "function_service_account",
        "scheduler_service_account",
        "build_service_account",
        "tasks_service_account",
        "alert_notification_channels",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return value or ""

    @model_validator(mode="after")
    def _within_limits(self) -> DeployConfig:
        for name, ms in (
            ("JOB_TIMEOUT_MS", self.job_timeout_ms),
            ("RECLAIM_TIMEOUT_MS", self.reclaim_timeout_ms),
        ):
            if ms is not None and function_timeout_s(ms) > MAX_FUNCTION_TIMEOUT_S:
                raise ValueError(
                    f"{name}={ms} needs a function timeout of {function_timeout_s(ms)} s, above "
                    f"Cloud Functions' {MAX_FUNCTION_TIMEOUT_S} s limit"
                )
        problem = dispatch_deadline_problem(self.job_timeout_ms)
        if self.dispatch == "cloud_tasks" and problem:
            raise ValueError(problem)
        slots = self.max_instances * self.max_concurrent_jobs
        if self.dispatch == "cloud_tasks" and slots > MAX_CONCURRENT_DISPATCHES:
            raise ValueError(
                f"MAX_INSTANCES x MAX_CONCURRENT_JOBS = {slots} would be the queue's "
                f"max_concurrent_dispatches, above Cloud Tasks' {MAX_CONCURRENT_DISPATCHES}"
            )
        if self.max_concurrent_jobs > 1 and self.function_cpu < 1:
            raise ValueError(
                f"MAX_CONCURRENT_JOBS={self.max_concurrent_jobs} needs FUNCTION_CPU of at least 1 "
                "(Cloud Functions allows concurrency above 1 only with a whole vCPU)"
            )
        return self

    @field_validator("alert_notification_channels")
    @classmethod
    def _channel_names(cls, value: str) -> str:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if not re.fullmatch(r"projects/[^/]+/notificationChannels/[^/]+", name):
                raise ValueError(
                    f"ALERT_NOTIFICATION_CHANNELS: {name!r} is not a channel's resource name "
                    "(projects/PROJECT/notificationChannels/ID; "
                    "`gcloud beta monitoring channels list` shows them)"
                )
        return value

    @property
    def alert_channels(self) -> list[str]:
        return [v.strip() for v in self.alert_notification_channels.split(",") if v.strip()]

    @property
    def build_account(self) -> str:
        """Since July 2024 a new project's default build account may lack the roles a function's
        build needs (Cloud Functions, "Custom service account for Cloud Build"), so the plan
        always names one; DEPLOYMENT.md grants it exactly those roles."""
        return (
            self.build_service_account or f"sona-builder@{self.google_cloud_project}.iam.gserviceaccount.com"
        )

    @property
    def runtime_account(self) -> str:
        return (
            self.function_service_account
            or f"sona-functions@{self.google_cloud_project}.iam.gserviceaccount.com"
        )

    @property
    def queue_path(self) -> str:
        return f"projects/{self.google_cloud_project}/locations/{self.region}/queues/{self.tasks_queue}"

    @property
    def run_job_url(self) -> str:
        """Known before the deploy: 2nd gen functions answer on their cloudfunctions.net address,
        which is also the audience of the tasks' OIDC token."""
        return f"https://{self.region}-{self.google_cloud_project}.cloudfunctions.net/{self.run_job_function}"

    @property
    def tasks_account(self) -> str:
        return self.tasks_service_account or f"sona-tasks@{self.google_cloud_project}.iam.gserviceaccount.com"

    @property
    def job_services(self) -> list[str]:
        """The Cloud Run services whose logs carry the job lines (the worker runs jobs; in direct
        mode the door does)."""
        if self.dispatch == "cloud_tasks":
            return [self.run_job_function]
        return [self.process_job_function]

    @property
    def scheduler_account(self) -> str:
        return (
            self.scheduler_service_account
            or f"sona-scheduler@{self.google_cloud_project}.iam.gserviceaccount.com"
        )


def passthrough_settings(environ: dict[str, str]) -> dict[str, str]:
    """The function's non-secret settings present in the environment, as deployed env vars."""
    names = {n.upper() for n in Settings.model_fields} - {n.upper() for n in SECRET_FIELDS}
    # set from the deploy's own names
    names -= {"PROCESS_JOB_URL", "DISPATCH", "CLOUD_TASKS_QUEUE", "RUN_JOB_URL", "TASKS_SERVICE_ACCOUNT"}
    return {k: environ[k] for k in sorted(names) if environ.get(k)}


class Shell:
    """Renders argv to a shell line; ${VAR} references stay expandable (double-quoted)."""

    @staticmethod
    def word(arg: str) -> str:
        if "${" in arg:
            return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'
        return shlex.quote(arg)

    @classmethod
    def line(cls, argv: list[str]) -> str:
        return " ".join(cls.word(a) for a in argv)


# Candidates for gcloud's alternate delimiter (`gcloud topic escaping`: `^D^` first makes D the
# separator instead of the comma). It must appear in no value it separates: "@" once did, until a
# service account email became one of the values.
ENV_DELIMITERS = ("|", "~", "#", "@", ";")


def env_flag(values: dict[str, str]) -> str:
    items = [f"{k}={v}" for k, v in values.items()]
    usable = [d for d in ENV_DELIMITERS if not any(d in item for item in items)]
    if not usable:
        raise ValueError(f"no delimiter in {ENV_DELIMITERS} is free of every --set-env-vars value")
    return f"--set-env-vars=^{usable[0]}^" + usable[0].join(items)


def deploy_commands(config: DeployConfig, environ: dict[str, str]) -> list[str]:
    common = [f"--region={config.region}", f"--project={config.google_cloud_project}"]
    secrets = (
        f"SUPABASE_SERVICE_ROLE_KEY={config.supabase_service_role_key_secret}:latest,"
        f"STABLE_AUDIO_API_KEY={config.stable_audio_api_key_secret}:latest,"
        f"WEBHOOK_SECRET={config.webhook_secret_secret}:latest"
    )
    if any(environ.get(m.upper()) == "tangoflux" for m in PLUGIN_MODE_MODELS):
        secrets += f",REPLICATE_API_TOKEN={config.replicate_api_token_secret}:latest"
    settings = passthrough_settings(environ)
    settings["DISPATCH"] = config.dispatch
    if config.dispatch == "cloud_tasks":
        settings["CLOUD_TASKS_QUEUE"] = config.queue_path
        settings["RUN_JOB_URL"] = config.run_job_url
        settings["TASKS_SERVICE_ACCOUNT"] = config.tasks_account
    settings["SUPABASE_URL"] = config.supabase_url
    settings["JOB_TIMEOUT_MS"] = str(config.job_timeout_ms)
    settings["MAX_CONCURRENT_JOBS"] = str(config.max_concurrent_jobs)
    settings["LOG_FORMAT"] = "json"
    # Cloud Functions (2nd gen) does not set it, and Cloud Logging needs it to link a line's trace.
    settings["GOOGLE_CLOUD_PROJECT"] = config.google_cloud_project
    settings = dict(sorted(settings.items()))

    def deploy(
        name: str,
        entry_point: str,
        *,
        public: bool,
        timeout_s: int,
        concurrency: int,
        max_instances: int,
        env: dict[str, str],
    ) -> list[str]:
        return [
            "gcloud",
            "functions",
            "deploy",
            name,
            "--gen2",
            f"--runtime={RUNTIME}",
            *common,
            "--source=.",
            f"--entry-point={entry_point}",
            "--trigger-http",
            # The door's access is set by public_access_commands after the deploy, so the deploy
            # leaves it as it is (--quiet: no prompt for a new function, which starts private);
            # the others are private, whatever anyone bound before.
            "--quiet" if public else "--no-allow-unauthenticated",
            f"--service-account={config.runtime_account}",
            f"--build-service-account=projects/{config.google_cloud_project}/serviceAccounts/{config.build_account}",
            f"--timeout={timeout_s}s",
            f"--memory={config.function_memory}",
            f"--cpu={config.function_cpu:g}",
            f"--concurrency={concurrency}",
            f"--max-instances={max_instances}",
            # gunicorn serves as many requests at once as it has threads.
            env_flag({**env, "THREADS": str(concurrency)}),
            f"--set-secrets={secrets}",
        ]

    reclaim_ms = config.reclaim_timeout_ms or config.job_timeout_ms
    reclaim_timeout = function_timeout_s(reclaim_ms)
    describe = ["gcloud", "functions", "describe"]
    uri = ["--gen2", *common, "--format=value(serviceConfig.uri)"]
    location = [f"--location={config.region}", f"--project={config.google_cloud_project}"]
    scheduler_flags = [
        *location,
        f"--schedule={config.reclaim_schedule}",
        "--time-zone=Etc/UTC",
        "--uri=${RECLAIM_JOBS_URL}",
        "--http-method=POST",
        f"--oidc-service-account-email={config.scheduler_account}",
        "--oidc-token-audience=${RECLAIM_JOBS_URL}",
        f"--attempt-deadline={min(reclaim_timeout, MAX_SCHEDULER_DEADLINE_S)}s",
    ]
    scheduler = ["gcloud", "scheduler", "jobs"]

    def job_function(name: str, target: str, *, public: bool) -> str:
        """A function that may run a job (the private worker; the door, which runs it in direct
        mode): the job's timeout, and MAX_CONCURRENT_JOBS x MAX_INSTANCES slots."""
        return Shell.line(
            deploy(
                name,
                target,
                public=public,
                timeout_s=function_timeout_s(config.job_timeout_ms),
                concurrency=config.max_concurrent_jobs,
                max_instances=config.max_instances,
                env=settings,
            )
        )

    worker: list[str] = []
    if config.dispatch == "cloud_tasks":
        worker = [
            *queue_commands(config),
            job_function(config.run_job_function, "run_job", public=False),
            *task_identity_commands(config),
        ]
    return [
        "set -euo pipefail",
        *HELPERS,
        *worker,
        job_function(config.process_job_function, "process_job", public=True),
        *public_access_commands(config, config.process_job_function),
        f'PROCESS_JOB_URL="$({Shell.line([*describe, config.process_job_function, *uri])})"',
        Shell.line(
            deploy(
                config.reclaim_jobs_function,
                "reclaim_jobs",
                public=False,
                timeout_s=reclaim_timeout,
                concurrency=1,
                max_instances=1,
                env={**settings, "PROCESS_JOB_URL": "${PROCESS_JOB_URL}"},
            )
        ),
        f'RECLAIM_JOBS_URL="$({Shell.line([*describe, config.reclaim_jobs_function, *uri])})"',
        Shell.line(
            [
                "gcloud",
                "functions",
                "add-invoker-policy-binding",
                config.reclaim_jobs_function,
                *common,
                f"--member=serviceAccount:{config.scheduler_account}",
            ]
        ),
        # create the first time, update in place after that
        f"if {Shell.line([*scheduler, 'describe', config.scheduler_job, *location])} >/dev/null 2>&1; then",
        "  " + Shell.line([*scheduler, "update", "http", config.scheduler_job, *scheduler_flags]),
        "else",
        "  " + Shell.line([*scheduler, "create", "http", config.scheduler_job, *scheduler_flags]),
        "fi",
        *monitoring_commands(config, Shell.line),
    ]


# What IAM answers when the domain-restricted-sharing org policy refuses allUsers
# (constraints/iam.allowedPolicyMemberDomains; the error as firebase/firebase-tools#2238 shows it).
NO_INVOKER_CHECK = "--no-invoker-iam-check"
DRS_REFUSALS = ("do not belong to a permitted customer", "iam.allowedPolicyMemberDomains")


def public_access_commands(config: DeployConfig, function: str) -> list[str]:
    """The webhook's door must answer pg_net, which cannot mint a Google token. An allUsers invoker
    binding does it where the org allows; under domain restricted sharing that binding is refused,
    and Cloud Run's documented alternative is to disable the invoker IAM check on the service
    (Cloud Run, "Allowing public (unauthenticated) access": `gcloud run services update SERVICE
    --no-invoker-iam-check`). Any other failure stops the plan."""
    where = [f"--region={config.region}", f"--project={config.google_cloud_project}"]
    bind = ["gcloud", "functions", "add-invoker-policy-binding", function, *where, "--member=allUsers"]
    refused = " || ".join(f'[[ "${{SONA_OUT}}" == *"{text}"* ]]' for text in DRS_REFUSALS)
    return [
        f'if ! SONA_OUT="$({Shell.line(bind)} 2>&1)"; then',
        f"  if {refused}; then",
        "    " + Shell.line(["gcloud", "run", "services", "update", function, *where, NO_INVOKER_CHECK]),
        "  else",
        "    printf '%s\\n' \"${SONA_OUT}\" >&2; exit 1",
        "  fi",
        "fi",
    ]


def task_identity_commands(config: DeployConfig) -> list[str]:
    """Who may run a job: Cloud Tasks mints the tasks' OIDC token as the tasks account, which the
    functions' runtime account (the enqueuer) must be allowed to act as (iam.serviceAccountUser on
    that account: Cloud Tasks, "Create HTTP target tasks"), and only that account may invoke the
    private worker (run.invoker, which add-invoker-policy-binding grants on a 2nd gen function)."""
    project = f"--project={config.google_cloud_project}"
    return [
        Shell.line(
            [
                "gcloud",
                "iam",
                "service-accounts",
                "add-iam-policy-binding",
                config.tasks_account,
                f"--member=serviceAccount:{config.runtime_account}",
                "--role=roles/iam.serviceAccountUser",
                project,
            ]
        ),
        Shell.line(
            [
                "gcloud",
                "functions",
                "add-invoker-policy-binding",
                config.run_job_function,
                f"--region={config.region}",
                project,
                f"--member=serviceAccount:{config.tasks_account}",
            ]
        ),
    ]


def queue_limits(config: DeployConfig) -> QueueLimits:
    return QueueLimits(
        max_dispatches_per_second=config.provider_rate_per_s,
        max_concurrent_dispatches=config.max_instances * config.max_concurrent_jobs,
        lease_s=function_timeout_s(config.job_timeout_ms) + LEASE_MARGIN_S,
        max_attempts_per_job=config.max_attempts,
    )


def queue_flags(config: DeployConfig) -> list[str]:
    limits = queue_limits(config)
    return [
        f"--location={config.region}",
        f"--project={config.google_cloud_project}",
        f"--max-dispatches-per-second={limits.max_dispatches_per_second:g}",
        f"--max-concurrent-dispatches={limits.max_concurrent_dispatches}",
        f"--max-attempts={limits.max_attempts}",
        f"--min-backoff={limits.min_backoff_s}s",
        f"--max-backoff={limits.max_backoff_s}s",
        f"--max-doublings={limits.max_doublings}",
        f"--max-retry-duration={limits.max_retry_duration_s}s",
    ]


def queue_commands(config: DeployConfig) -> list[str]:
    """Create the queue or update it in place, and let the function's account (only) enqueue."""
    queues = ["gcloud", "tasks", "queues"]
    where = [f"--location={config.region}", f"--project={config.google_cloud_project}"]
    flags = queue_flags(config)
    return [
        f"if {Shell.line([*queues, 'describe', config.tasks_queue, *where])} >/dev/null 2>&1; then",
        "  " + Shell.line([*queues, "update", config.tasks_queue, *flags]),
        "else",
        "  " + Shell.line([*queues, "create", config.tasks_queue, *flags]),
        "fi",
        Shell.line(
            [
                *queues,
                "add-iam-policy-binding",
                config.tasks_queue,
                *where,
                f"--member=serviceAccount:{config.runtime_account}",
                "--role=roles/cloudtasks.enqueuer",
            ]
        ),
    ]


def render(config: DeployConfig, environ: dict[str, str]) -> str:
    return "\n".join(deploy_commands(config, environ)) + "\n"
