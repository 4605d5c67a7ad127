"""The whole flow on one machine: embedded PostgreSQL with the migrations, the Supabase gateway,
the webhook relay, both functions as real functions-framework processes, and Stable Audio (the real
API when STABLE_AUDIO_API_KEY is set, otherwise the offline synthesiser behind the same contract)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import psycopg
import requests
from psycopg.rows import RowFactory, dict_row, tuple_row
from psycopg.types.json import Jsonb

from devstack.connections import shared as shared_connections
from devstack.database import (
    REPO_ROOT,
    EmbeddedPostgres,
    apply_sql,
    create_database,
    discard_tree,
    drop_database,
    memory_scratch,
    migrate,
    migration_turn,
)
from devstack.doubles.replicate_double import ReplicateDouble
from devstack.doubles.stable_audio_double import StableAudioDouble
from devstack.emulators.cloud_run import CapacityCap, Invokers
from devstack.emulators.cloud_tasks import CloudTasksEmulator
from devstack.emulators.gateway import Gateway, make_jwt
from devstack.emulators.relay import DEFAULT_PAUSE_S, WebhookRelay
from devstack.emulators.user_jwt import make_user_jwt
from devstack.events import CHANGES, UNWATCHED_POLL_S, DatabaseChanges, WaitTimedOut
from devstack.function_forks import FunctionForks
from sona.audio.ffmpeg import find_ffmpeg
from sona.config import Settings, load_settings
from sona.ops.webhook_sql import WebhookConfig, webhook_sql
from sona.supabase_keys import PUBLISHABLE_PREFIX, SECRET_PREFIX
from sona.task_queue import QueueLimits

log = logging.getLogger(__name__)

# Settings the stack owns: the function must talk to this stack, whatever the shell says.
STACK_OWNED = {
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "WEBHOOK_SECRET",
    "PROCESS_JOB_URL",
    "CLOUD_TASKS_API_URL",
    "CLOUD_TASKS_QUEUE",
    "RUN_JOB_URL",
    "TASKS_SERVICE_ACCOUNT",
}
LOCAL_QUEUE = "projects/sona-local/locations/local/queues/sona-jobs"
# The account whose OIDC token the local tasks carry, the only invoker of the local run_job.
TASKS_ACCOUNT = "sona-tasks@sona-local.iam.gserviceaccount.com"
TERMINAL = ("completed", "failed")
# The keys the stack issues: the legacy JWTs (service_role, anon) and the new sb_secret_/sb_publishable_.
FunctionKey = Literal["service_role", "anon", "secret", "publishable"]


class Child(Protocol):
    """A started process as this module uses it: a Popen, or a forked function."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, process: Child | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s} s")


def wait_port_free(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.02)


class FunctionProcess:
    """One functions-framework process serving a target of main.py."""

    # Set by the test suite (tests/conftest.py): processes of this interpreter are then forked from
    # a server that has imported the libraries already (devstack/function_forks.py).
    forks: ClassVar[FunctionForks | None] = None

    def __init__(
        self,
        target: str,
        env: Mapping[str, str],
        log_path: Path,
        port: int = 0,
        source: Path = REPO_ROOT / "main.py",
        python: str = sys.executable,
    ) -> None:
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--target", target, "--source", str(source), "--host", "127.0.0.1", "--port", str(self.port)]
        self.process: Child
        self._log: BinaryIO | None = None  # a fork opens the log itself
        if self.forks is not None and python == sys.executable:
            self.process = self.forks.start(argv, env, log_path, cwd=REPO_ROOT)
        else:
            self._log = log_path.open("ab")
            self.process = subprocess.Popen(
                [python, "-m", "functions_framework", *argv],
                cwd=REPO_ROOT,
                env=dict(env),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group, so a kill takes gunicorn's worker too
            )

    def wait_ready(self, timeout_s: float = 30) -> FunctionProcess:
        wait_for_port(self.port, timeout_s, self.process)
        return self

    def send_signal(self, sig: int) -> None:
        """Send without waiting, so several processes can wind down at once (gunicorn takes about a
        second to end on SIGTERM: its workers notice on their next 1 s poll)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.send_signal(sig)
            self.process.wait(timeout=10)
            # gunicorn's worker is a grandchild: until it is gone its socket still accepts (and then
            # resets) connections, so a new instance must not be trusted before the port is free.
            wait_port_free(self.port, timeout_s=10)
        if self._log is not None:
            self._log.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class LocalStack:
    def __init__(
        self,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        start_functions: bool = True,
        with_relay: bool = True,
        double_latency_s: float = 0.0,
        double_generation_s: float = 0.0,
        process_env: Mapping[str, str] | None = None,
        service_role_key: str | None = None,
        function_key: FunctionKey = "service_role",
        webhook_secret: str | None = None,
        ports: Mapping[str, int] | None = None,
        capacity: tuple[int, int] | None = None,
        database_url: str | None = None,
        before_migrations: Callable[[str], None] | None = None,
        relay_pause_s: float = DEFAULT_PAUSE_S,
        database_server: str | None = None,
        functions_url: str | None = None,
        reclaim_function: bool = True,
    ) -> None:
        """`capacity` (instances, jobs per instance) puts a Cloud Run-like cap in front of the
        function that runs jobs (run_job with Cloud Tasks, process_job in direct mode): requests
        beyond it wait up to 10 s, then get 429. With Cloud Tasks run_job is private: its front
        lets through only the tasks' OIDC token (devstack/emulators/cloud_run.py). `database_url` runs the
        stack on an existing PostgreSQL (a copy of production) instead of an embedded one: Supabase's
        roles and schemas are added only where missing, the migrations applied on top, no row
        dropped; the database is left running and kept when the stack stops. `before_migrations`
        builds what the database held before this project (the plug-in's schema and rows, say).
        `relay_pause_s` is pg_net's pause between batches (1 s, as pg_net has it); a test of
        something else may shorten it. `database_server` (a PostgreSQL URL) puts the stack's
        database on that server, dropped on stop, instead of starting an embedded server of its own
        (the test suite shares one). `functions_url` is the developer's own Edge Functions
        server, which the gateway forwards /functions/v1/* to. `reclaim_function=False` leaves out
        the reclaim_jobs process (a test that never calls it over HTTP saves a second of CPU)."""
        self.reclaim_function = reclaim_function
        self.before_migrations = before_migrations
        self.root = root
        self.ports = dict(ports or {})  # gateway, process_job, reclaim_jobs: free ones unless given
        self.overrides = dict(env or {})
        self.start_functions = start_functions
        self.with_relay = with_relay
        self.double_latency_s = double_latency_s
        self.double_generation_s = double_generation_s  # how long a Stable Audio 3 generation runs
        self.process_env = dict(os.environ if process_env is None else process_env)
        self.jwt_secret = secrets.token_urlsafe(32)
        # Fresh keys each run; tests may pass sentinel values to look for in logs and rows.
        self.service_role_key = service_role_key or make_jwt(self.jwt_secret, "service_role")
        self.anon_key = make_jwt(self.jwt_secret, "anon")
        # The new keys a project issues beside the legacy JWTs.
        self.secret_key = SECRET_PREFIX + secrets.token_urlsafe(24)
        self.publishable_key = PUBLISHABLE_PREFIX + secrets.token_urlsafe(24)
        self.function_key = function_key  # which of the four the functions get
        # The password every local user signs in with (the gateway's password grant).
        self.local_password = secrets.token_urlsafe(12)
        self.functions_url = functions_url
        self.webhook_secret = webhook_secret or secrets.token_urlsafe(24)
        self.postgres = EmbeddedPostgres(root / "pgdata")
        self._scratch: Path | None = None  # the memory filesystem's folder holding its data dir
        self.database_server = database_server
        self._own_database = ""  # the database made on database_server, dropped on stop
        self.double: StableAudioDouble | None = None
        self.replicate: ReplicateDouble | None = None
        self.functions: dict[str, FunctionProcess] = {}
        self.relay: WebhookRelay | None = None
        self.capacity = capacity
        self.relay_pause_s = relay_pause_s
        self.cap: CapacityCap | None = None
        self.tasks: CloudTasksEmulator | None = None
        self.existing_database_url = database_url
        self.oidc_key = secrets.token_bytes(32)  # the local Google's ID-token signing key
        self.worker_front: CapacityCap | None = None
        self.run_job_url = ""
        self.database_url = ""
        self.changes: DatabaseChanges | None = None  # NOTIFYs from the stack's own database only

    @property
    def real_provider(self) -> bool:
        return (
            bool(self.process_env.get("STABLE_AUDIO_API_KEY"))
            and "STABLE_AUDIO_API_KEY" not in self.overrides
        )

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> LocalStack:
        """Check the configuration before starting anything; if a part fails to start, stop the
        parts already running, so a failed start leaves no process behind."""
        self.check_configuration()
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalStack:
        self.root.mkdir(parents=True, exist_ok=True)
        self.database_url = self.existing_database_url or self._new_database()
        if self.before_migrations is not None:
            self.before_migrations(self.database_url)
        with migration_turn(self.database_server) if self.database_server else contextlib.nullcontext():
            prepare_database(self.database_url)
        if self.existing_database_url is None:  # never a trigger in a database we were handed
            self.changes = DatabaseChanges(self.database_url)
        self.gateway = Gateway(
            self.database_url,
            self.root / "storage",
            service_role_key=self.service_role_key,
            anon_key=self.anon_key,
            jwt_secret=self.jwt_secret,
            secret_key=self.secret_key,
            publishable_key=self.publishable_key,
            functions_url=self.functions_url,
            local_password=self.local_password,
        )
        self.supabase_url = self.gateway.start(port=self.ports.get("gateway", 0))
        if not self.real_provider:
            self.double = StableAudioDouble(
                self.overrides.get("STABLE_AUDIO_API_KEY") or "sk-local-" + secrets.token_hex(8),
                latency_s=self.double_latency_s,
                generation_s=self.double_generation_s,
            )
            self.double.start()
        if not self.process_env.get("REPLICATE_API_TOKEN"):  # TangoFlux's double, unless a real token
            self.replicate = ReplicateDouble("r8_local_" + secrets.token_hex(12))
            self.replicate.start()
        self.process_job_port = self.ports.get("process_job") or free_port()
        self.process_job_url = f"http://127.0.0.1:{self.process_job_port}"
        self.run_job_port = self.ports.get("run_job") or free_port()
        if self.dispatch == "cloud_tasks":
            self.tasks = CloudTasksEmulator(oidc_key=self.oidc_key)
            self.tasks.start()
            self._start_worker_front()
        elif self.capacity is not None:
            instances, per_instance = self.capacity
            self.cap = CapacityCap(
                self.process_job_url,
                instances=instances,
                concurrency=per_instance,
                timeout_s=self.settings().function_timeout_s,
            )
            self.process_job_url = self.cap.start()
        if self.tasks is not None:
            self._create_queue()
        if self.start_functions:
            ports = {"process_job": self.process_job_port}
            if self.reclaim_function:
                ports["reclaim_jobs"] = self.ports.get("reclaim_jobs", 0)
            if self.tasks is not None:
                ports["run_job"] = self.run_job_port
            self.start_functions_together(ports)
        self.install_webhook(self.process_job_url)
        if self.with_relay:
            self.relay = WebhookRelay(self.database_url, pause_s=self.relay_pause_s)
            self.relay.start()
        return self

    def _start_worker_front(self) -> None:
        """run_job is private: Cloud Run's front checks the task's token, then caps the slots."""
        instances, per_instance = self.capacity or (100, int(self.function_env()["THREADS"]))
        self.cap = self.worker_front = CapacityCap(
            f"http://127.0.0.1:{self.run_job_port}",
            instances=instances,
            concurrency=per_instance,
            timeout_s=self.settings(run_job_url="http://127.0.0.1").function_timeout_s,
            invokers=Invokers(frozenset({TASKS_ACCOUNT}), self.oidc_key),
        )
        self.run_job_url = self.worker_front.start()

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.tasks is not None:
            self.tasks.stop()
        if self.cap is not None:
            self.cap.stop()
        for function in self.functions.values():
            function.send_signal(signal.SIGTERM)  # all at once; each stop() below then waits for its own
        for function in self.functions.values():
            function.stop()
        if self.double is not None:
            self.double.stop()
        if self.replicate is not None:
            self.replicate.stop()
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            gateway.stop()
        if self.changes is not None:
            self.changes.close()
            self.changes = None
        shared_connections(self.database_url).close()
        self._drop_database()

    def _new_database(self) -> str:
        """An empty database: on the given server, or the only one of a new embedded server. That
        server's data dir is deleted on stop, so it goes on a memory filesystem when there is room
        (memory_scratch: copying the pristine cluster into it cost 0.6 CPU-s on this VM's disk)."""
        if self.database_server is None:
            scratch = memory_scratch()
            if scratch is not None:
                # The wheel keeps a lock file in XDG_RUNTIME_DIR (read once, at its import) and
                # takes it again after the data dir is gone: it stays in the stack's root.
                runtime = self.root / "run"
                runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
                self._scratch = Path(tempfile.mkdtemp(prefix="sona-stack-", dir=scratch))
                self.postgres = EmbeddedPostgres(self._scratch / "pgdata")
            return self.postgres.start()
        name = f"stack_{secrets.token_hex(6)}"
        self._own_database = name
        return create_database(self.database_server, name)

    def _drop_database(self) -> None:
        if self.database_server is None:
            self.postgres.stop()
            if self._scratch is not None:
                discard_tree(self._scratch)
                self._scratch = None
        elif self._own_database:
            drop_database(self.database_server, self._own_database)
            self._own_database = ""

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration -------------------------------------------------------------------------
    def function_env(self, **extra: str) -> dict[str, str]:
        """What a function process sees: the shell's settings, then the stack's own, then overrides."""
        env = {k: v for k, v in self.process_env.items() if k.upper() not in STACK_OWNED}
        env.update(
            {
                "SUPABASE_URL": self.supabase_url,
                "SUPABASE_SERVICE_ROLE_KEY": self.keys[self.function_key],
                "WEBHOOK_SECRET": self.webhook_secret,
                "PROCESS_JOB_URL": self.process_job_url,
                "PYTHONUNBUFFERED": "1",
                # As on Cloud Functions, where ffmpeg is on PATH: no wheel lookup at startup.
                "FFMPEG_BINARY": find_ffmpeg(),
            }
        )
        if self.double is not None:
            env["STABLE_AUDIO_API_KEY"] = self.double.api_key
            env.setdefault("STABLE_AUDIO_API_URL", self.double.url)  # the shell's URL wins
            env.setdefault("STABLE_AUDIO_3_API_URL", self.double.v3_url)
        if self.replicate is not None:
            env["REPLICATE_API_TOKEN"] = self.replicate.api_token
            env["REPLICATE_API_URL"] = self.replicate.url
        if self.tasks is not None:
            env.update(
                {
                    "CLOUD_TASKS_API_URL": self.tasks.url,
                    "CLOUD_TASKS_QUEUE": LOCAL_QUEUE,
                    "RUN_JOB_URL": self.run_job_url,
                    "TASKS_SERVICE_ACCOUNT": TASKS_ACCOUNT,
                }
            )
        env.setdefault("THREADS", "8")
        env.update(self.overrides)
        env.update(extra)
        return env

    @property
    def dispatch(self) -> str:
        """As in production (cloud_tasks) unless DISPATCH says otherwise."""
        return self.overrides.get("DISPATCH") or self.process_env.get("DISPATCH") or "cloud_tasks"

    def _create_queue(self) -> None:
        """The queue with the limits the deploy gives it; its slots are the function's threads (or
        the capacity cap's), as max instances x MAX_CONCURRENT_JOBS are in production."""
        assert self.tasks is not None
        settings = self.settings()
        slots = int(self.function_env()["THREADS"])
        if self.capacity is not None:
            slots = self.capacity[0] * self.capacity[1]
        limits = QueueLimits(
            max_dispatches_per_second=settings.provider_rate_per_s,
            max_concurrent_dispatches=slots,
            lease_s=settings.lease_seconds,
            max_attempts_per_job=settings.max_attempts,
        )
        parent = LOCAL_QUEUE.rsplit("/queues/", 1)[0]
        response = requests.post(
            f"{self.tasks.url}/v2/{parent}/queues", json=limits.as_queue(LOCAL_QUEUE), timeout=10
        )
        response.raise_for_status()

    def settings(self, **extra: Any) -> Settings:
        return Settings(**_settings_fields(self.function_env(), **extra))

    def check_configuration(self) -> Settings:
        """The functions' settings with the stack's own values stood in for: raises ConfigError
        listing every problem, as `validate` does."""
        env = {k: v for k, v in self.process_env.items() if k.upper() not in STACK_OWNED}
        env.update(
            {
                "SUPABASE_URL": "http://127.0.0.1",
                "SUPABASE_SERVICE_ROLE_KEY": self.service_role_key,
                "WEBHOOK_SECRET": self.webhook_secret,
                "PROCESS_JOB_URL": "http://127.0.0.1",
                "CLOUD_TASKS_API_URL": "http://127.0.0.1",
                "CLOUD_TASKS_QUEUE": LOCAL_QUEUE,
                "RUN_JOB_URL": "http://127.0.0.1",
                "TASKS_SERVICE_ACCOUNT": TASKS_ACCOUNT,
            }
        )
        if not self.real_provider:
            env.setdefault("STABLE_AUDIO_API_KEY", "sk-local-double")
        env.setdefault("REPLICATE_API_TOKEN", "r8_local_double")  # the stack's double stands in
        env.update(self.overrides)
        return load_settings(**_settings_fields(env))

    def start_function(self, target: str, port: int = 0, **extra_env: str) -> FunctionProcess:
        old = self.functions.get(target)
        if old is not None:
            old.stop()
        function = FunctionProcess(
            target, self.function_env(**extra_env), self.root / "logs" / f"{target}.log", port
        )
        self.functions[target] = function.wait_ready()
        return function

    def start_functions_together(self, ports: Mapping[str, int]) -> None:
        """Both processes start side by side (each takes most of a second to import and listen)."""
        for target, port in ports.items():
            self.functions[target] = FunctionProcess(
                target, self.function_env(), self.root / "logs" / f"{target}.log", port
            )
        for function in list(self.functions.values()):
            function.wait_ready()

    def install_webhook(self, url: str) -> None:
        # The stack's own key, so a test can hand the functions a key they must refuse.
        settings = self.settings(supabase_service_role_key=self.service_role_key)
        config = WebhookConfig(
            job_timeout_ms=settings.job_timeout_ms,
            dispatch=settings.dispatch,
            jobs_schema=settings.jobs_schema,
            jobs_table=settings.jobs_table,
        )
        apply_sql(self.database_url, webhook_sql(config, url, secret=settings.webhook_secret))

    @property
    def keys(self) -> dict[FunctionKey, str]:
        return {
            "service_role": self.service_role_key,
            "anon": self.anon_key,
            "secret": self.secret_key,
            "publishable": self.publishable_key,
        }

    @property
    def reclaim_jobs_url(self) -> str:
        return self.functions["reclaim_jobs"].url

    def describe(self) -> dict[str, str]:
        return {
            "supabase_url": self.supabase_url,
            "service_role_key": self.service_role_key,
            "anon_key": self.anon_key,
            "secret_key": self.secret_key,
            "publishable_key": self.publishable_key,
            "database_url": without_password(self.database_url),
            "webhook_secret": self.webhook_secret,
            "process_job_url": self.process_job_url,
            "run_job_url": self.run_job_url,
            "reclaim_jobs_url": self.functions["reclaim_jobs"].url
            if "reclaim_jobs" in self.functions
            else "",
            "stable_audio_api_url": self.double.url
            if self.double
            else self.process_env.get("STABLE_AUDIO_API_URL", ""),
            "storage_dir": str(self.root / "storage"),
            "dispatch": self.dispatch,
            "cloud_tasks_url": self.tasks.url if self.tasks else "",
            "functions_url": self.functions_url or "",
        }

    # -- the plug-in's side --------------------------------------------------------------------
    def create_user(self, email: str | None = None) -> uuid.UUID:
        with self._connection(autocommit=True) as conn:
            # A real auth.users has no default id (Supabase Auth makes it): give one.
            row = conn.execute(
                "insert into auth.users (id, email) values (gen_random_uuid(), %s) returning id",
                (email or f"musician-{uuid.uuid4().hex[:8]}@example.com",),
            ).fetchone()
        assert row is not None
        return uuid.UUID(str(row[0]))

    def has_token_tables(self) -> bool:
        """Whether the database holds the plug-in's tokens (its balance table and the charge)."""
        with self._connection(autocommit=True) as conn:
            row = conn.execute(
                "select to_regclass('public.user_tokens') is not null"
                " and to_regprocedure('public.use_tokens(uuid, integer, text)') is not null"
            ).fetchone()
        return bool(row and row[0])

    def user_token(self, user_id: uuid.UUID) -> str:
        """The access token Supabase Auth would give this user after sign-in (an hour long): send
        it as `Authorization: Bearer` with the publishable (or anon) key as `apikey`."""
        return make_user_jwt(self.jwt_secret, user_id)

    def sign_in(self) -> dict[str, str]:
        """A new local user, their token, and what signs them in again (supabase-js's
        signInWithPassword against the gateway): what a client needs to act as a musician."""
        email = f"musician-{uuid.uuid4().hex[:8]}@example.com"
        user_id = self.create_user(email)
        return {
            "user_id": str(user_id),
            "user_token": self.user_token(user_id),
            "user_email": email,
            "user_password": self.local_password,
        }

    def insert_job(
        self,
        prompt: str,
        duration: int = 10,
        quality: str = "medium",
        mode: str = "default",
        user_id: uuid.UUID | None = None,
        input_path: str | None = None,
        strength: float | None = None,
    ) -> uuid.UUID:
        """Insert as the plug-in's user would: the authenticated role, under row level security."""
        user_id = user_id or self.create_user()
        with self._connection() as conn:
            conn.execute("set local role authenticated")
            conn.execute(
                "select set_config('request.jwt.claims', %s, true)",
                (f'{{"sub": "{user_id}", "role": "authenticated"}}',),
            )
            row = conn.execute(
                "insert into public.jobs (user_id, prompt, duration, quality, mode, input_path, strength)"
                " values (%s, %s, %s, %s, %s, %s, %s) returning id",
                (user_id, prompt, duration, quality, mode, input_path, strength),
            ).fetchone()
            conn.commit()
        assert row is not None
        return uuid.UUID(str(row[0]))

    def insert_as_generate(
        self,
        prompt: str,
        duration: int,
        quality: str,
        mode: str,
        user_id: uuid.UUID | None = None,
        **json_columns: dict[str, Any],
    ) -> uuid.UUID:
        """Insert as the plug-in's generate Edge Function does (docs/plugin-client.md): with the service role,
        status queued, and musical_key / producer_config / naming_convention as JSON strings."""
        user_id = user_id or self.create_user()
        values: dict[str, Any] = {
            "user_id": user_id,
            "prompt": prompt.strip(),
            "duration": duration,
            "quality": quality,
            "mode": mode,
            "status": "queued",
            "skip_naming": False,
            **{name: Jsonb(json.dumps(value)) for name, value in json_columns.items()},
        }
        names = ", ".join(values)
        marks = ", ".join(["%s"] * len(values))
        with self._connection() as conn:
            conn.execute("set local role service_role")
            row = conn.execute(
                f"insert into public.jobs ({names}) values ({marks}) returning id",  # type: ignore[arg-type]
                list(values.values()),
            ).fetchone()
            conn.commit()
        assert row is not None
        return uuid.UUID(str(row[0]))

    def upload_input(self, user_id: uuid.UUID, name: str, data: bytes, content_type: str) -> str:
        """Upload into the user's folder of the inputs bucket as the plug-in does (supabase-py's
        storage client, the publishable key and the user's token); returns the path for the row."""
        from storage3 import SyncStorageClient

        headers = {"apikey": self.publishable_key, "Authorization": f"Bearer {self.user_token(user_id)}"}
        client = SyncStorageClient(f"{self.supabase_url}/storage/v1/", headers)
        path = f"{user_id}/{name}"
        bucket = self.settings().supabase_input_bucket
        client.from_(bucket).upload(path, data, {"content-type": content_type, "upsert": "true"})
        return path

    def _connection(
        self, autocommit: bool = False, row_factory: RowFactory[Any] = tuple_row
    ) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A reused connection for the helpers below (each new one costs the server a backend start)."""
        return shared_connections(self.database_url).borrow(autocommit, row_factory)

    def postgres_connection(self) -> psycopg.Connection[Any]:
        """A superuser connection in autocommit, for setting up and inspecting."""
        return psycopg.connect(self.database_url, autocommit=True)

    def job(self, job_id: uuid.UUID) -> dict[str, Any]:
        with self._connection(row_factory=dict_row) as conn:
            row = conn.execute("select * from public.jobs where id = %s", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return dict(row)

    def wait_for(
        self, job_id: uuid.UUID, statuses: tuple[str, ...] = TERMINAL, timeout_s: float = 60
    ) -> dict[str, Any]:
        """The job's row once its status is one of `statuses`, looked at after each commit the
        database reports (DatabaseChanges); at the timeout, the row as it then is (the caller's
        assert names the status it wanted), the wait logged with what it waited for."""
        # One connection for the whole wait: a new one per look costs the server a backend start.
        with self._connection(autocommit=True, row_factory=dict_row) as conn:

            def reached() -> dict[str, Any] | None:
                row = conn.execute("select * from public.jobs where id = %s", (job_id,)).fetchone()
                if row is None:
                    raise KeyError(job_id)
                return dict(row) if row["status"] in statuses else None

            try:
                return self.wait_until(reached, timeout_s, f"job {job_id} to be one of {statuses}")  # type: ignore[no-any-return]
            except WaitTimedOut as timed_out:
                row = self.job(job_id)
                log.warning("%s; it is %s", timed_out, row["status"])
                return row

    def wait_until(self, check: Callable[[], Any], timeout_s: float = 30, what: str = "") -> Any:
        """`check()`'s first true answer, looked for after each change in the stack (its database's
        commits, the relay's, the queue's, the doubles'); raises WaitTimedOut saying `what`. Over a
        database the stack was handed, which reports nothing, it also looks every 50 ms."""
        poll_s = UNWATCHED_POLL_S if self.changes is None else None
        return CHANGES.wait_until(check, timeout_s, what, poll_s)

    def local_file(self, url: str) -> Path:
        """Where the gateway keeps the object a public or signed URL names."""
        path = url.split("/storage/v1/object/", 1)[1].split("?", 1)[0]
        for prefix in ("public/", "sign/", "authenticated/"):
            path = path.removeprefix(prefix)
        return self.root / "storage" / path


def prepare_database(url: str) -> None:
    """Supabase's stand-ins where missing (auth, storage, roles, pg_net, webhooks), then every
    migration: nothing here drops a row, so it is safe on a copy of a production database."""
    migrate(url)
    apply_sql(url, _stand_in("supabase_functions_stand_in.sql"))


def without_password(url: str) -> str:
    """A database URL fit to print: its password, if any, replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _settings_fields(env: Mapping[str, str], **extra: Any) -> dict[str, Any]:
    fields = set(Settings.model_fields)
    values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k.lower() in fields}
    values.update(extra)
    return values


def _stand_in(name: str) -> str:
    from importlib import resources

    return resources.files("devstack").joinpath(f"sql/{name}").read_text()
