"""The one source of truth for deployment: the exact gcloud commands, derived from the configuration.

`scripts/deploy.sh` runs (or with --dry-run prints) them; Cloud Build runs the same script, so the
two paths cannot drift. Both read their settings from one file, deploy.env (DEPLOY_SETTINGS): Cloud
Build never sees an operator's environment or .env, and `--set-env-vars` / `--set-secrets` replace
everything a function had, so a setting only one path knew would be dropped by the other.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from sona.config import (
    LEASE_MARGIN_S,
    MAX_FUNCTION_TIMEOUT_S,
    SECRET_FIELDS,
    ConfigError,
    FunctionOptions,
    function_timeout_s,
)
from sona.environment import ENV_FILE, EnvironmentSettings, load, read_env_file
from sona.ops.monitoring import HELPERS, monitoring_commands
from sona.task_queue import QueueLimits

RUNTIME = "python312"
# Cloud Scheduler waits at most 30 minutes for an HTTP target.
MAX_SCHEDULER_DEADLINE_S = 1800
# A Cloud Tasks queue allows at most 5,000 concurrent dispatches and 500 dispatches a second.
MAX_CONCURRENT_DISPATCHES = 5000
# The file both deploy paths read (DEPLOYMENT.md, section 1); DEPLOY_SETTINGS names another.
DEPLOY_SETTINGS = Path("deploy.env")
# pg_net sends up to this many webhooks at once (its batch_size): the door must take them all, or
# Cloud Run answers 429 after about 10 s and pg_net never retries.
PG_NET_BATCH = 200
# The door's whole work is one CreateTask call, which the webhook gives 10 s (sona/webhook_sql.py):
# this leaves room for a cold start.
DOOR_TIMEOUT_S = 30


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
    # The account whose OIDC token every task carries to run_job is the functions' own setting
    # TASKS_SERVICE_ACCOUNT (Plan.tasks_account; sona-tasks@PROJECT unless set).
    # The account Cloud Build builds the functions as (see build_account).
    build_service_account: str = ""
    # Monitoring notification channels the pause alert notifies, comma-separated resource names
    # (projects/P/notificationChannels/ID); DEPLOYMENT.md shows how to make an email channel.
    alert_notification_channels: str = ""
    # The worker (and reclaim): each instance runs MAX_CONCURRENT_JOBS jobs, each a whole job long.
    function_memory: str = "1Gi"
    function_cpu: float = Field(default=1, gt=0)
    max_instances: int = Field(default=10, ge=1)
    max_concurrent_jobs: int = Field(default=2, ge=1, le=1000)
    # The door (DISPATCH=cloud_tasks): a few hundred short requests at once, each one CreateTask.
    door_memory: str = "512Mi"
    door_concurrency: int = Field(default=80, ge=1, le=1000)
    door_max_instances: int = Field(default=5, ge=1)
    # Secret Manager secret names (never values).
    supabase_service_role_key_secret: str = "sona-supabase-service-role-key"  # noqa: S105
    stable_audio_api_key_secret: str = "sona-stable-audio-api-key"  # noqa: S105
    webhook_secret_secret: str = "sona-webhook-secret"  # noqa: S105
    # Only where a mode is served by TangoFlux (DESIGNER_MODEL=tangoflux, ...).
    replicate_api_token_secret: str = "sona-replicate-api-token"  # noqa: S105

    # The Cloud Tasks queue's name (its limits follow from the function's settings).
    tasks_queue: str = "sona-jobs"

    @field_validator(
        "function_service_account",
        "scheduler_service_account",
        "build_service_account",
        "alert_notification_channels",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return value or ""

    @field_validator("google_cloud_project")
    @classmethod
    def _project_id(cls, value: str) -> str:
        # Google's rule for a project id: 6 to 30 lower-case letters, digits and hyphens.
        if not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", value):
            raise ValueError("must be a project id (6 to 30 lower-case letters, digits and hyphens)")
        return value

    @model_validator(mode="after")
    def _within_limits(self) -> DeployConfig:
        if self.max_concurrent_jobs > 1 and self.function_cpu < 1:
            raise ValueError(
                f"MAX_CONCURRENT_JOBS={self.max_concurrent_jobs} needs FUNCTION_CPU of at least 1 "
                "(Cloud Functions allows concurrency above 1 only with a whole vCPU)"
            )
        if self.door_concurrency * self.door_max_instances < PG_NET_BATCH:
            raise ValueError(
                f"DOOR_CONCURRENCY x DOOR_MAX_INSTANCES = {self.door_concurrency * self.door_max_instances} "
                f"cannot take a pg_net batch of {PG_NET_BATCH} webhooks at once"
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
    def default_tasks_account(self) -> str:
        return f"sona-tasks@{self.google_cloud_project}.iam.gserviceaccount.com"

    @property
    def scheduler_account(self) -> str:
        return (
            self.scheduler_service_account
            or f"sona-scheduler@{self.google_cloud_project}.iam.gserviceaccount.com"
        )


# The role each kind of command in the plan needs (the deploy account holds exactly these, plus
# logging.logWriter for a user-named build's logs and iam.serviceAccountUser on the accounts it
# deploys with: DEPLOYMENT.md, section 4). tests/test_deploy.py checks every command has its role.
DEPLOYER_ROLES = {
    ("functions",): "roles/cloudfunctions.developer",
    ("run", "services"): "roles/run.admin",  # the invoker check, where allUsers is refused
    ("tasks", "queues"): "roles/cloudtasks.admin",  # the queue and its IAM policy
    ("scheduler", "jobs"): "roles/cloudscheduler.admin",
    ("logging", "metrics"): "roles/logging.configWriter",
    ("monitoring", "dashboards"): "roles/monitoring.dashboardEditor",
    ("monitoring", "policies"): "roles/monitoring.alertPolicyEditor",
    ("iam", "service-accounts"): "roles/iam.serviceAccountAdmin",  # on sona-tasks only
    ("artifacts", "repositories"): "roles/artifactregistry.admin",  # the cleanup policy
}

# Set by the plan itself, whatever a settings file says.
DERIVED = ("PROCESS_JOB_URL", "CLOUD_TASKS_QUEUE", "RUN_JOB_URL", "FUNCTION_ROLE")


def setting_names() -> set[str]:
    """Every variable a deploy reads: the plan's own and the functions' non-secret ones."""
    return {n.upper() for n in (*DeployConfig.model_fields, *FunctionOptions.model_fields)}


def read_settings(path: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The deploy's settings: the file, which both paths read. A setting the environment gives
    differently (a shell export, Cloud Build's GOOGLE_CLOUD_PROJECT) is refused rather than used,
    since the other path would not see it."""
    if not path.is_file():
        raise ConfigError(
            [
                f"{path} not found: both deploy paths (scripts/deploy.sh and Cloud Build) read the "
                "deploy's settings from it; copy deploy.env.example and fill it in (DEPLOYMENT.md, 1)"
            ]
        )
    values = {k.upper(): v for k, v in read_env_file(path).items()}
    problems = [
        f"{name} is a secret: {path} travels in the build's upload; keep it in Secret Manager only"
        for name in sorted(n.upper() for n in SECRET_FIELDS)
        if values.get(name)
    ]
    problems += [
        f"{name} is set in the environment but {path} "
        + ("says otherwise" if name in values else "does not set it")
        + f"; Cloud Build reads only {path}: set it there"
        for name in sorted(setting_names())
        if environ.get(name) and environ[name] != values.get(name)
    ]
    if problems:
        raise ConfigError(problems)
    return values


def not_deployed(values: Mapping[str, str], env_file: Path = ENV_FILE) -> list[str]:
    """The settings a local .env gives that the deploy would not: named, so none is lost unseen."""
    if not env_file.is_file():
        return []
    local = {k.upper(): v for k, v in read_env_file(env_file).items()}
    names = {n.upper() for n in FunctionOptions.model_fields} - set(DERIVED)
    return [
        f"{name} from {env_file} is not deployed: deploy.env "
        + ("sets it otherwise" if name in values else "does not set it")
        for name in sorted(names & set(local))
        if values.get(name) != local[name]
    ]


@dataclass(frozen=True)
class Plan:
    """The deploy's names and sizes, and the functions' settings exactly as they will read them."""

    config: DeployConfig
    options: FunctionOptions
    env: dict[str, str]

    @property
    def google_cloud_project(self) -> str:
        return self.config.google_cloud_project

    @property
    def alert_channels(self) -> list[str]:
        return self.config.alert_channels

    @property
    def cloud_tasks(self) -> bool:
        return self.options.dispatch == "cloud_tasks"

    @property
    def tasks_account(self) -> str:
        return self.options.tasks_service_account or self.config.default_tasks_account

    @property
    def job_services(self) -> list[str]:
        """The Cloud Run services whose logs carry the job lines (the worker runs jobs; in direct
        mode the door does)."""
        return [self.config.run_job_function if self.cloud_tasks else self.config.process_job_function]


def function_env(config: DeployConfig, values: Mapping[str, str]) -> dict[str, str]:
    """Every function's environment variables: the functions' settings the file gives, the wiring
    the plan derives (the queue, the worker's address, the tasks' account) and the log format."""
    names = {n.upper() for n in FunctionOptions.model_fields} - set(DERIVED)
    env = {k: values[k] for k in sorted(names) if values.get(k)}
    if env.get("DISPATCH", "cloud_tasks") == "cloud_tasks":
        env["CLOUD_TASKS_QUEUE"] = config.queue_path
        env["RUN_JOB_URL"] = config.run_job_url
        env.setdefault("TASKS_SERVICE_ACCOUNT", config.default_tasks_account)
    env["LOG_FORMAT"] = "json"
    # Cloud Functions (2nd gen) does not set it, and Cloud Logging needs it to link a line's trace.
    env["GOOGLE_CLOUD_PROJECT"] = config.google_cloud_project
    return dict(sorted(env.items()))


def make_plan(values: Mapping[str, str]) -> Plan:
    """Everything checked before anything deploys: the plan's settings, and the functions' as each
    function will read them at start (a ConfigError lists every problem of both)."""
    problems: list[str] = []
    try:
        config = load(DeployConfig, environ=values, env_file=None)
    except ConfigError as exc:
        problems += exc.problems
        # The functions' settings are still checked, under a placeholder project, so one run
        # lists every problem.
        config = DeployConfig(google_cloud_project="placeholder-project")
    env = function_env(config, values)
    try:
        options = load(FunctionOptions, environ=env, env_file=None)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    limits_problem = _queue_problem(config, options)
    if limits_problem:
        raise ConfigError([limits_problem])
    # Named even when it is the default, so a function's mode shows in its configuration.
    return Plan(config, options, dict(sorted({**env, "DISPATCH": options.dispatch}.items())))


def _queue_problem(config: DeployConfig, options: FunctionOptions) -> str | None:
    reclaim_ms = options.reclaim_timeout_ms
    if reclaim_ms is not None and function_timeout_s(reclaim_ms) > MAX_FUNCTION_TIMEOUT_S:
        return (
            f"RECLAIM_TIMEOUT_MS={reclaim_ms} needs a function timeout of "
            f"{function_timeout_s(reclaim_ms)} s, "
            f"above Cloud Functions' {MAX_FUNCTION_TIMEOUT_S} s limit"
        )
    slots = config.max_instances * config.max_concurrent_jobs
    if options.dispatch == "cloud_tasks" and slots > MAX_CONCURRENT_DISPATCHES:
        return (
            f"MAX_INSTANCES x MAX_CONCURRENT_JOBS = {slots} would be the queue's "
            f"max_concurrent_dispatches, above Cloud Tasks' {MAX_CONCURRENT_DISPATCHES}"
        )
    return None


def plan_from_file(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Plan:
    given = os.environ if environ is None else environ
    path = path or Path(given.get("DEPLOY_SETTINGS") or DEPLOY_SETTINGS)
    return make_plan(read_settings(path, given))


class Shell:
    """Renders argv to a shell line. A ${VAR} the plan itself sets stays expandable (only it is
    double-quoted); every other character, a `$` in a setting included, is quoted literally."""

    VARIABLE = re.compile(r"(\$\{[A-Z_]+\})")

    @classmethod
    def word(cls, arg: str) -> str:
        parts = [p for p in cls.VARIABLE.split(arg) if p]
        if len(parts) == 1 and not cls.VARIABLE.fullmatch(parts[0]):
            return shlex.quote(arg)
        return "".join(f'"{p}"' if cls.VARIABLE.fullmatch(p) else shlex.quote(p) for p in parts)

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


def secret_bindings(plan: Plan, *, door: bool) -> str:
    """Only the secrets a function reads: the door (cloud_tasks) checks the webhook's secret and
    enqueues; whatever runs or reclaims jobs needs the keys too, and TangoFlux's token where a
    mode names it."""
    config = plan.config
    names = {"WEBHOOK_SECRET": config.webhook_secret_secret}
    if not (door and plan.cloud_tasks):
        names["SUPABASE_SERVICE_ROLE_KEY"] = config.supabase_service_role_key_secret
        names["STABLE_AUDIO_API_KEY"] = config.stable_audio_api_key_secret
        if plan.options.tangoflux_modes:
            names["REPLICATE_API_TOKEN"] = config.replicate_api_token_secret
    order = ["SUPABASE_SERVICE_ROLE_KEY", "STABLE_AUDIO_API_KEY", "WEBHOOK_SECRET", "REPLICATE_API_TOKEN"]
    return ",".join(f"{n}={names[n]}:latest" for n in order if n in names)


@dataclass(frozen=True)
class Size:
    timeout_s: int
    memory: str
    concurrency: int
    max_instances: int


def deploy_function(
    plan: Plan, name: str, entry_point: str, size: Size, env: dict[str, str], *, door: bool
) -> str:
    config = plan.config
    return Shell.line(
        [
            "gcloud",
            "functions",
            "deploy",
            name,
            "--gen2",
            f"--runtime={RUNTIME}",
            f"--region={config.region}",
            f"--project={config.google_cloud_project}",
            "--source=.",
            f"--entry-point={entry_point}",
            "--trigger-http",
            # The door's access is set by public_access_commands after the deploy, so the deploy
            # leaves it as it is (--quiet: no prompt for a new function, which starts private);
            # the others are private, whatever anyone bound before.
            "--quiet" if door else "--no-allow-unauthenticated",
            f"--service-account={config.runtime_account}",
            f"--build-service-account=projects/{config.google_cloud_project}/serviceAccounts/{config.build_account}",
            f"--timeout={size.timeout_s}s",
            f"--memory={size.memory}",
            f"--cpu={config.function_cpu:g}",
            f"--concurrency={size.concurrency}",
            f"--max-instances={size.max_instances}",
            # A rollback pins traffic to an older revision; without this the new revision would
            # serve 0% after it (Cloud Functions, "Traffic splitting").
            "--serve-all-traffic-latest-revision",
            # gunicorn serves as many requests at once as it has threads.
            env_flag({**env, "THREADS": str(size.concurrency)}),
            f"--set-secrets={secret_bindings(plan, door=door)}",
        ]
    )


def deploy_commands(plan: Plan) -> list[str]:
    config, options = plan.config, plan.options
    common = [f"--region={config.region}", f"--project={config.google_cloud_project}"]
    describe = ["gcloud", "functions", "describe"]
    uri = ["--gen2", *common, "--format=value(serviceConfig.uri)"]
    job_size = Size(
        function_timeout_s(options.job_timeout_ms),
        config.function_memory,
        config.max_concurrent_jobs,
        config.max_instances,
    )
    reclaim_timeout = function_timeout_s(options.reclaim_timeout_ms or options.job_timeout_ms)
    reclaim_size = Size(reclaim_timeout, config.function_memory, 1, 1)
    worker: list[str] = []
    door_size, door_env = job_size, plan.env  # in direct mode the door runs jobs
    if plan.cloud_tasks:
        worker = [
            *queue_commands(plan),
            deploy_function(plan, config.run_job_function, "run_job", job_size, plan.env, door=False),
            *task_identity_commands(plan),
        ]
        door_size = Size(
            DOOR_TIMEOUT_S, config.door_memory, config.door_concurrency, config.door_max_instances
        )
        door_env = {**plan.env, "FUNCTION_ROLE": "door"}
    return [
        "set -euo pipefail",
        *HELPERS,
        *worker,
        deploy_function(plan, config.process_job_function, "process_job", door_size, door_env, door=True),
        *public_access_commands(config, config.process_job_function),
        f'PROCESS_JOB_URL="$({Shell.line([*describe, config.process_job_function, *uri])})"',
        deploy_function(
            plan,
            config.reclaim_jobs_function,
            "reclaim_jobs",
            reclaim_size,
            {**plan.env, "PROCESS_JOB_URL": "${PROCESS_JOB_URL}"},
            door=False,
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
        *scheduler_commands(plan, reclaim_timeout),
        *cleanup_commands(config),
        *monitoring_commands(plan, Shell.line),
    ]


def scheduler_commands(plan: Plan, reclaim_timeout_s: int) -> list[str]:
    """Create the first time, update in place after that."""
    config = plan.config
    location = [f"--location={config.region}", f"--project={config.google_cloud_project}"]
    flags = [
        *location,
        f"--schedule={config.reclaim_schedule}",
        "--time-zone=Etc/UTC",
        "--uri=${RECLAIM_JOBS_URL}",
        "--http-method=POST",
        f"--oidc-service-account-email={config.scheduler_account}",
        "--oidc-token-audience=${RECLAIM_JOBS_URL}",
        f"--attempt-deadline={min(reclaim_timeout_s, MAX_SCHEDULER_DEADLINE_S)}s",
    ]
    jobs = ["gcloud", "scheduler", "jobs"]
    return [
        f"if {Shell.line([*jobs, 'describe', config.scheduler_job, *location])} >/dev/null 2>&1; then",
        "  " + Shell.line([*jobs, "update", "http", config.scheduler_job, *flags]),
        "else",
        "  " + Shell.line([*jobs, "create", "http", config.scheduler_job, *flags]),
        "fi",
    ]


# Every deploy pushes one image per function into this repository (Cloud Functions 2nd gen's
# default); without a cleanup policy they pile up, three a deploy, billed by the GB.
ARTIFACT_REPOSITORY = "gcf-artifacts"
REPOSITORY = Path(__file__).resolve().parents[2]
CLEANUP_POLICY_FILE = REPOSITORY / "deploy" / "artifact-cleanup-policy.json"


def cleanup_commands(config: DeployConfig) -> list[str]:
    """Artifact Registry deletes old images by the policy (keep each function's newest versions, so
    a rollback still finds its image). The repository exists once the first function is built."""
    return [
        Shell.line(
            [
                "gcloud",
                "artifacts",
                "repositories",
                "set-cleanup-policies",
                ARTIFACT_REPOSITORY,
                f"--location={config.region}",
                f"--project={config.google_cloud_project}",
                # scripts/deploy.sh and Cloud Build run the plan from the repository root.
                f"--policy={CLEANUP_POLICY_FILE.relative_to(REPOSITORY)}",
                "--no-dry-run",
            ]
        )
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


def task_identity_commands(plan: Plan) -> list[str]:
    """Who may run a job: Cloud Tasks mints the tasks' OIDC token as the tasks account, which the
    functions' runtime account (the enqueuer) must be allowed to act as (iam.serviceAccountUser on
    that account: Cloud Tasks, "Create HTTP target tasks"), and only that account may invoke the
    private worker (run.invoker, which add-invoker-policy-binding grants on a 2nd gen function)."""
    config = plan.config
    project = f"--project={config.google_cloud_project}"
    return [
        Shell.line(
            [
                "gcloud",
                "iam",
                "service-accounts",
                "add-iam-policy-binding",
                plan.tasks_account,
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
                f"--member=serviceAccount:{plan.tasks_account}",
            ]
        ),
    ]


def queue_limits(plan: Plan) -> QueueLimits:
    return QueueLimits(
        max_dispatches_per_second=plan.options.provider_rate_per_s,
        max_concurrent_dispatches=plan.config.max_instances * plan.config.max_concurrent_jobs,
        lease_s=function_timeout_s(plan.options.job_timeout_ms) + LEASE_MARGIN_S,
        max_attempts_per_job=plan.options.max_attempts,
    )


def queue_flags(plan: Plan) -> list[str]:
    limits = queue_limits(plan)
    return [
        f"--location={plan.config.region}",
        f"--project={plan.config.google_cloud_project}",
        f"--max-dispatches-per-second={limits.max_dispatches_per_second:g}",
        f"--max-concurrent-dispatches={limits.max_concurrent_dispatches}",
        f"--max-attempts={limits.max_attempts}",
        f"--min-backoff={limits.min_backoff_s}s",
        f"--max-backoff={limits.max_backoff_s}s",
        f"--max-doublings={limits.max_doublings}",
        f"--max-retry-duration={limits.max_retry_duration_s}s",
    ]


# What the functions' account may do on the queue, and no more: create tasks (the door, the worker's
# retries, reclaim) and list them (reclaim sends a task only for a due job that has none; ListTasks
# needs cloudtasks.tasks.list, which the enqueuer role lacks and Cloud Tasks Viewer holds).
QUEUE_ROLES = ("roles/cloudtasks.enqueuer", "roles/cloudtasks.viewer")


def queue_commands(plan: Plan) -> list[str]:
    """Create the queue or update it in place, and grant the function's account (only) its roles."""
    config = plan.config
    queues = ["gcloud", "tasks", "queues"]
    where = [f"--location={config.region}", f"--project={config.google_cloud_project}"]
    flags = queue_flags(plan)
    return [
        f"if {Shell.line([*queues, 'describe', config.tasks_queue, *where])} >/dev/null 2>&1; then",
        "  " + Shell.line([*queues, "update", config.tasks_queue, *flags]),
        "else",
        "  " + Shell.line([*queues, "create", config.tasks_queue, *flags]),
        "fi",
        *(
            Shell.line(
                [
                    *queues,
                    "add-iam-policy-binding",
                    config.tasks_queue,
                    *where,
                    f"--member=serviceAccount:{config.runtime_account}",
                    f"--role={role}",
                ]
            )
            for role in QUEUE_ROLES
        ),
    ]


def render(plan: Plan) -> str:
    return "\n".join(deploy_commands(plan)) + "\n"
