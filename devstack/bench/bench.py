"""`python -m devstack bench`: our own costs next to baselines measured in the same run.

Every figure is the median of several runs (with min and max), as a ratio to its baseline:
cold start against a bare functions-framework function, one 60 s job against ffmpeg encoding the
same WAV alone, peak memory against the WAV's size, throughput against the ideal, and one reclaim
of 10,000 expired leases in absolute time and database round trips, and job_stats() over a
million jobs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psutil
import requests

from devstack.bench.bench_path import ffmpeg_alone
from devstack.database import REPO_ROOT
from devstack.doubles.synth import synthesize_wav
from devstack.stack import FunctionProcess, LocalStack
from devstack.venvs import ensure_venv
from sona.audio.ffmpeg import find_ffmpeg
from sona.audio.master import make_master
from sona.models import webhook_payload
from sona.ops.stats import fold_settled_hours
from sona.store.jobs import JobsStore, Reclaimed

# The functions run as deployed: a virtual environment with requirements.txt only (the dev tools'
# extra packages change what some imports pull in, e.g. httpx's optional CLI imports pygments).
PRODUCTION_VENV = REPO_ROOT / ".sona" / "bench-venv"

BARE_STARTS = 3  # a cold-start run's baseline: the median of this many bare starts beside it
BARE_FUNCTION = textwrap.dedent("""
    import functions_framework


    @functions_framework.http
    def ok(request):
        return "ok"
""")


@dataclass
class Figure:
    name: str
    ours: list[float]
    baseline: list[float]
    unit: str
    baseline_name: str
    target: str
    higher_is_better: bool = False
    # Each run's baseline measured right beside that run of ours: the ratio of each pair is shown,
    # and its worst is what "in every run" is judged on (a median hides a slow run).
    paired: bool = False

    @property
    def ratio(self) -> float:
        """Ours over baseline (or baseline over ours when higher is better), from the medians."""
        ours, base = statistics.median(self.ours), statistics.median(self.baseline)
        return base / ours if self.higher_is_better else ours / base

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ratio": round(self.ratio, 3),
            "ours_median": statistics.median(self.ours),
            "ours_min": min(self.ours),
            "ours_max": max(self.ours),
            "baseline_median": statistics.median(self.baseline),
            "pair_ratios": [round(o / b, 3) for o, b in zip(self.ours, self.baseline, strict=True)]
            if self.paired
            else None,
        }


def production_python() -> str:
    """The python of a virtual environment holding only requirements.txt (made once, then reused;
    remade from scratch when requirements.txt changes, so nothing else lingers in it)."""
    requirements = REPO_ROOT / "requirements.txt"
    return str(ensure_venv(PRODUCTION_VENV, requirements, [requirements], clear=True))


def _post_until_answered(url: str, payload: dict[str, Any] | None, headers: dict[str, str]) -> None:
    while True:
        try:
            response = requests.post(url, json=payload, headers=headers, timeout=30)
            if response.ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.002)


def _time_first_answer(
    start: Callable[[], FunctionProcess], payload: dict[str, Any] | None, headers: dict[str, str]
) -> tuple[float, float]:
    """Wall seconds from process start to the first answer, and the CPU seconds the function's
    processes spent by then (steadier than wall time when other work shares the CPUs)."""
    started = time.perf_counter()
    function = start()
    try:
        _post_until_answered(function.url, payload, headers)
        wall = time.perf_counter() - started
        return wall, _cpu_seconds(function.process.pid)
    finally:
        function.stop()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU so far of a local process and its live children (a function's gunicorn
    arbiter and worker; a database backend has none)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def beside_its_baseline(
    ours: Callable[[], tuple[float, float]], bare: Callable[[], tuple[float, float]]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """One timing of ours (wall, CPU) and its baseline: the median of BARE_STARTS bare timings, one
    right before ours and the rest right after, each of wall and CPU on its own."""
    before = bare()
    timed = ours()
    around = [before, *(bare() for _ in range(BARE_STARTS - 1))]
    return timed, (statistics.median(w for w, _ in around), statistics.median(c for _, c in around))


def cold_start(stack: LocalStack, work: Path, runs: int, python: str) -> list[Figure]:
    """Process start to the first answer, for each kind of call: the webhook to the public door
    process_job (it enqueues a task) and a Cloud Tasks task to the private worker run_job (its claim
    finds the job already done; Cloud Run has checked the token before), against a bare function.
    As deployed: K_SERVICE set (Cloud Functions sets it) and JSON log lines with the project, so the
    structured-logging path is part of what is timed; and no FFMPEG_BINARY, so the function finds the
    imageio-ffmpeg wheel's binary (and runs it once) before its claim, as the deploy leaves it."""
    (work / "bare").mkdir(exist_ok=True)
    (work / "bare" / "main.py").write_text(BARE_FUNCTION)
    job_id = stack.insert_job("already done", duration=1)
    with stack.postgres_connection() as conn:
        conn.execute("update jobs set status = 'completed' where id = %s", (job_id,))
    env = {
        **{k: v for k, v in stack.function_env().items() if k != "FFMPEG_BINARY"},
        "K_SERVICE": "process-job",
        "K_REVISION": "process-job-00001-abc",
        "LOG_FORMAT": "json",
        "GOOGLE_CLOUD_PROJECT": "sona-bench",
    }
    calls = {
        "webhook": ("process_job", webhook_payload(job_id), {"X-Webhook-Secret": stack.webhook_secret}),
        "task": ("run_job", {"job_id": str(job_id)}, {}),
    }
    ours: dict[str, list[float]] = {kind: [] for kind in calls}
    bare: dict[str, list[float]] = {kind: [] for kind in calls}
    ours_cpu: dict[str, list[float]] = {kind: [] for kind in calls}
    bare_cpu: dict[str, list[float]] = {kind: [] for kind in calls}

    def bare_function() -> FunctionProcess:
        source = work / "bare" / "main.py"
        return FunctionProcess("ok", {"PATH": env["PATH"]}, work / "bare.log", source=source, python=python)

    for i in range(runs):
        for kind, (target, payload, headers) in calls.items():
            # Bare starts right before and right after each of ours, so a run's baseline shares the
            # machine's moment; their median, as one bare start alone swung from 0.26 to 0.42 s on
            # this VM (2026-12-07) and moved a run's ratio with it.
            log = work / f"cold-{kind}-{i}.log"
            start = functools.partial(FunctionProcess, target, env, log, python=python)
            (wall, cpu), (bare_wall, bare_cpu_s) = beside_its_baseline(
                functools.partial(_time_first_answer, start, payload, headers),
                functools.partial(_time_first_answer, bare_function, None, {}),
            )
            ours[kind].append(wall)
            ours_cpu[kind].append(cpu)
            bare[kind].append(bare_wall)
            bare_cpu[kind].append(bare_cpu_s)
    figures = []
    for kind in calls:
        baseline = f"bare functions-framework function (median of {BARE_STARTS} beside each run)"
        figures.append(
            Figure(
                f"cold start ({kind})",
                ours[kind],
                bare[kind],
                "s",
                baseline,
                "<= 2.0x in every run",
                paired=True,
            )
        )
        figures.append(
            Figure("  the same, CPU seconds", ours_cpu[kind], bare_cpu[kind], "s", baseline, "-", paired=True)
        )
    return figures


def _worker(function: FunctionProcess) -> psutil.Process:
    arbiter = psutil.Process(function.process.pid)
    deadline = time.monotonic() + 10
    while not arbiter.children() and time.monotonic() < deadline:
        time.sleep(0.01)
    return arbiter.children()[0]


def _status_kb(process: psutil.Process, field: str) -> int:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {process.pid}")


def _rss(process: psutil.Process) -> int:
    return _status_kb(process, "VmRSS") * 1024


def _deliver(stack: LocalStack, url: str, job_id: uuid.UUID) -> dict[str, Any]:
    response = requests.post(
        url, json=webhook_payload(job_id), timeout=120, headers={"X-Webhook-Secret": stack.webhook_secret}
    )
    answer = dict(response.json())
    if answer.get("outcome") != "completed":
        raise RuntimeError(f"benchmark job did not complete: {answer}")
    return answer


def job_overhead_and_memory(stack: LocalStack, work: Path, runs: int, python: str) -> tuple[Figure, Figure]:
    """One 60 s stereo job, request to response, with an instant provider; and the function
    process's peak memory during it above its idle size (a fresh instance per run, warmed up by a
    1 s job, so the kernel's high-water mark is this job's)."""
    ffmpeg = find_ffmpeg()
    master = make_master(synthesize_wav("bench 60", 60 * 61.6 / 60), 60, ffmpeg)
    (work / "master.wav").write_bytes(master.wav)
    walls, peaks, encodes = [], [], []
    for i in range(runs):
        function = FunctionProcess(
            "process_job", stack.function_env(DISPATCH="direct"), work / f"job-{i}.log", python=python
        ).wait_ready()
        try:
            worker = _worker(function)
            _deliver(stack, function.url, stack.insert_job("bench 60", duration=1))  # imports, clients
            job_id = stack.insert_job("bench 60", duration=60)
            idle = _rss(worker)
            started = time.perf_counter()
            _deliver(stack, function.url, job_id)
            walls.append(time.perf_counter() - started)
            peaks.append((_status_kb(worker, "VmHWM") * 1024 - idle) / 1e6)
        finally:
            function.stop()
        # The median of several encodes per run, so the baseline does not swing with one of them.
        encodes.append(statistics.median(ffmpeg_alone(work / "master.wav", work / "alone.mp3")))
    wav_mb = len(master.wav) / 1e6
    return (
        Figure("job overhead (60 s job)", walls, encodes, "s", "ffmpeg alone (median of 5)", "<= 1.10x"),
        Figure("peak memory above idle", peaks, [wav_mb] * len(peaks), "MB", "the WAV's size", "<= 1.5x"),
    )


def throughput(
    stack: LocalStack,
    work: Path,
    python: str,
    runs: int,
    jobs: int = 40,
    concurrency: int = 8,
    latency_s: float = 2.0,
) -> tuple[Figure, dict[str, Any]]:
    """40 jobs of 10 s at concurrency 8 in one instance, with a provider that takes 2 s; and where
    the time goes: the CPU each job costs (the function's Python, its ffmpeg runs, this process's
    stand-ins) and the median of each step the attempts timed."""
    assert stack.double is not None
    env = stack.function_env(
        THREADS=str(concurrency), MAX_CONCURRENT_JOBS=str(concurrency), DISPATCH="direct"
    )
    function = FunctionProcess("process_job", env, work / "throughput.log", python=python).wait_ready()
    cpu: dict[str, float] = {"function": 0.0, "ffmpeg": 0.0, "stand-ins": 0.0}
    measured: list[uuid.UUID] = []
    try:
        worker = _worker(function)
        _deliver(stack, function.url, stack.insert_job("bench 10", duration=10))  # warm up
        started = time.perf_counter()
        _deliver(stack, function.url, stack.insert_job("bench 10", duration=10))
        one_job = time.perf_counter() - started
        ideal = jobs / concurrency * latency_s + one_job
        stack.double.latency_s = latency_s
        walls = []
        for _ in range(runs):
            ids = [stack.insert_job("bench 10", duration=10) for _ in range(jobs)]
            before = _job_cpu_seconds(worker)
            started = time.perf_counter()
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(lambda j: _deliver(stack, function.url, j), ids))
            walls.append(time.perf_counter() - started)
            for name, spent in _job_cpu_seconds(worker).items():
                cpu[name] += spent - before[name]
            measured += ids
    finally:
        stack.double.latency_s = 0.0
        function.stop()
    figure = Figure(
        "throughput (40 x 10 s, concurrency 8)",
        walls,
        [ideal] * len(walls),
        "s",
        "ideal: 40/8 x 2 s + one job",
        ">= 0.9 of ideal",
        higher_is_better=True,
    )
    cpu_s_per_job, cpus = sum(cpu.values()) / len(measured), os.cpu_count() or 1
    detail = {
        "cpu_ms_per_job": {name: round(spent * 1000 / len(measured)) for name, spent in cpu.items()},
        "median_step_ms": _median_steps(stack, measured),
        "ideal_s": round(ideal, 3),
        "cpus": cpus,
        "fastest_possible_s": round(
            fastest_possible_drain_s(jobs, concurrency, latency_s, cpu_s_per_job, cpus), 3
        ),
    }
    return figure, detail


def fastest_possible_drain_s(
    jobs: int, concurrency: int, latency_s: float, cpu_s_per_job: float, cpus: int
) -> float:
    """A floor under the throughput run's wall time with what the ideal leaves out: the jobs' own CPU.
    Each of the `concurrency` slots runs jobs/concurrency jobs (40 over 8 divides evenly), each
    job a wait of latency_s and then its CPU, spread at best over every CPU (cpu_s_per_job/cpus).
    The first round's waits all end together, so its last job cannot finish before every first-round
    job's CPU is spent: latency + concurrency x share. Its slot then needs at least latency + share
    for each of its other jobs. A job's CPU is taken as after its wait, where nearly all of it falls
    (the encode, the uploads; the claim and the first stage before it are about 30 ms of 450); what
    is counted per job (the function, its ffmpeg runs, the stand-ins) leaves out the database's."""
    rounds = math.ceil(jobs / concurrency)
    share = cpu_s_per_job / cpus
    return rounds * latency_s + (concurrency + rounds - 1) * share


def _job_cpu_seconds(worker: psutil.Process) -> dict[str, float]:
    """CPU spent so far: the function's worker process, the ffmpeg runs it has reaped, and this
    process (the gateway, the Stable Audio double: the stand-ins for remote services)."""
    mine, theirs = psutil.Process().cpu_times(), worker.cpu_times()
    return {
        "function": theirs.user + theirs.system,
        "ffmpeg": theirs.children_user + theirs.children_system,
        "stand-ins": mine.user + mine.system,
    }


def _median_steps(stack: LocalStack, ids: list[uuid.UUID]) -> dict[str, float]:
    with stack.postgres_connection() as conn:
        rows = [r[0] for r in conn.execute(
            "select timings_ms from job_attempts where job_id = any(%s)", (ids,)
        ).fetchall()]  # fmt: skip
    keys = sorted({key for row in rows for key in row})
    return {key: statistics.median(row.get(key, 0) for row in rows) for key in keys}


RECLAIM_FILL = (
    "with j as (insert into jobs (user_id, prompt, duration, status, attempts, lease_token,"
    " lease_expires_at, started_at) select %s, 'lease ' || i, 5, 'processing', 1,"
    " gen_random_uuid(), now() - interval '1 minute', now() - interval '10 minutes'"
    " from generate_series(1, %s) i returning id, lease_token)"
    " insert into job_attempts (job_id, attempt, lease_token) select id, 1, lease_token from j"
)
# The statements of reclaim_and_dispatch (supabase/schemas/30_state_machine.sql), told apart by their text.
RECLAIM_STATEMENTS = (
    ("v_at_release :=", "count what could be due"),
    ("with expired as", "release expired leases, end their attempts, stamp the due"),
    ("did not finish", "fail the old worker's jobs"),
    ("could not be finished after", "fail waiting jobs with no attempts left"),
    ("unavailable for too long", "fail jobs that waited out an outage"),
    ("with due as", "dispatch the other due jobs"),
)
# Each statement inside the function, with its triggers' time, as auto_explain reports them.
AUTO_EXPLAIN = (
    "load 'auto_explain'",
    "set auto_explain.log_min_duration = 0",
    "set auto_explain.log_nested_statements = on",
    "set auto_explain.log_analyze = on",
    "set auto_explain.log_timing = on",
    "set auto_explain.log_triggers = on",
    "set auto_explain.log_format = json",
    "set client_min_messages = log",
)


def reclaim_at_scale(
    stack: LocalStack, runs: int, expired: int = 10_000
) -> tuple[Figure, int, dict[str, list[float]]]:
    """One reclaim call over 10,000 expired leases: its time, how many round trips it takes, and its
    parts: the client's validation of that answer, and from calls of their own on the same rows,
    reclaim_and_dispatch() alone in the database, and each of its statements with each trigger they fire
    (auto_explain, whose timing adds to them). What the whole call spends beyond the database and
    the validation is the RPC: HTTP, the local gateway's JSON, the client's parsing."""
    store = JobsStore(stack.settings())
    user = stack.create_user()
    settings = stack.settings()
    args = (
        settings.max_attempts,
        settings.reclaim_grace_s,
        settings.reclaim_limit,
        settings.retry_delay_ms,
        settings.retry_backoff_cap_ms,
    )
    times, trips = [], set()
    parts: dict[str, list[float]] = {}
    for _ in range(runs):
        _fill_expired_leases(stack, user, expired)
        before = stack.gateway.counts["rpc:reclaim_and_dispatch"]
        started = time.perf_counter()
        reclaimed = store.reclaim()
        times.append(time.perf_counter() - started)
        trips.add(stack.gateway.counts["rpc:reclaim_and_dispatch"] - before)
        if reclaimed.released != expired:
            raise RuntimeError(f"reclaim released {reclaimed.released} of {expired}")
        answer = reclaimed.model_dump(mode="json")
        started = time.perf_counter()
        Reclaimed.model_validate(answer)
        parts.setdefault("the client's validation of the answer", []).append(time.perf_counter() - started)
        _fill_expired_leases(stack, user, expired)
        with stack.postgres_connection() as conn:
            cpu_before = _cpu_seconds(conn.info.backend_pid)
            started = time.perf_counter()
            conn.execute("select reclaim_and_dispatch(%s, %s, %s, %s, %s)", args)
            alone = time.perf_counter() - started
            cpu = _cpu_seconds(conn.info.backend_pid) - cpu_before
            conn.rollback()
        parts.setdefault("reclaim_and_dispatch() alone, in the database", []).append(alone)
        # The server's CPU for that call: steadier than its wall time when other work shares the CPUs.
        parts.setdefault("  the same, CPU time of its server process", []).append(cpu)
        _fill_expired_leases(stack, user, expired)
        for name, seconds in _reclaim_statements(stack, args).items():
            parts.setdefault(name, []).append(seconds)
    with stack.postgres_connection() as conn:
        conn.execute("truncate jobs cascade")
    figure = Figure(
        "reclaim 10,000 expired leases",
        times,
        [0.5] * len(times),
        "s",
        "the 0.5 s budget",
        "one call, < 0.5 s",
    )
    return figure, max(trips), parts


def _fill_expired_leases(stack: LocalStack, user: uuid.UUID, expired: int) -> None:
    with stack.postgres_connection() as conn:
        conn.execute("truncate jobs cascade")
        conn.execute(RECLAIM_FILL, (user, expired))  # type: ignore[arg-type]  # a constant
        conn.execute("analyze jobs")
        conn.execute("analyze job_attempts")


def _reclaim_statements(stack: LocalStack, args: tuple[int, ...]) -> dict[str, float]:
    """Seconds per statement of one reclaim_and_dispatch() call, and per trigger (`  trigger <name>`) within
    them, from auto_explain's plans sent to this session."""
    plans: list[str] = []
    with stack.postgres_connection() as conn:
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        for setting in AUTO_EXPLAIN:
            conn.execute(setting)  # type: ignore[arg-type]  # constants
        conn.execute("select reclaim_and_dispatch(%s, %s, %s, %s, %s)", args)
        conn.rollback()
    seconds: dict[str, float] = {}
    for message in plans:
        head, _, body = message.partition("plan:")
        if not head.startswith("duration:"):
            continue
        plan = json.loads(body)
        text = plan.get("Query Text", "")
        name = next((label for key, label in RECLAIM_STATEMENTS if key in text), None)
        if name is None:  # the settings' and the pause's lookups, and the call itself
            continue
        seconds[name] = seconds.get(name, 0.0) + float(head.split()[1]) / 1000
        for trigger in plan.get("Triggers", []):
            key = f"  trigger {trigger.get('Constraint Name') or trigger['Trigger Name']}"
            seconds[key] = seconds.get(key, 0.0) + float(trigger.get("Time", 0.0)) / 1000
    return seconds


# 1,000,000 jobs, one in ten retried once, every attempt timed, in two shapes: a month of history
# (the default 24 h window holds about 33,000 of them) and a single full day (the window holds all
# of them: about what a day at the queue's top rate can hold).
STATS_ROWS = 1_000_000
STATS_SHAPES = {"1,000,000 jobs in one day": 1, "1,000,000 jobs over 30 days": 30}
# The job_stats() definition before settled hours were folded: the baseline, on the same rows.
PREVIOUS_JOB_STATS = "sql/bench_job_stats_before_folding.sql"


def _previous_job_stats() -> str:
    return resources.files("devstack").joinpath(PREVIOUS_JOB_STATS).read_text()


POPULATE_STATS = """
with j as (
  insert into jobs (user_id, prompt, duration, status, attempts, created_at, started_at, completed_at)
  select %(user)s, 'history', 10,
         case when i %% 50 = 0 then 'failed' else 'completed' end,
         case when i %% 10 = 0 then 2 else 1 end,
         t, t + interval '2 seconds', t + interval '30 seconds'
    from generate_series(1, %(rows)s) i,
         lateral (select now() - make_interval(secs => i * %(days)s * 86400.0 / %(rows)s)) c(t)
  returning id, attempts, created_at, status
)
insert into job_attempts (job_id, attempt, lease_token, started_at, finished_at, outcome, outcome_class,
                          timings_ms)
select j.id, n, gen_random_uuid(), j.created_at + interval '2 seconds', j.created_at + interval '30 seconds',
       case when n < j.attempts then 'released' when j.status = 'failed' then 'failed' else 'completed' end,
       case when n < j.attempts then 'provider_transient' when j.status = 'failed' then 'storage' end,
       jsonb_build_object('claim', 5, 'generate', 20000 + (random() * 8000)::int,
                          'upload', 300 + (random() * 200)::int, 'total', 26000)
  from j, generate_series(1, j.attempts) n
"""


def job_stats_at_scale(stack: LocalStack, runs: int) -> list[Figure]:
    """job_stats() as `python -m sona stats` calls it (one RPC) over the default 24-hour window, for
    each shape of 1,000,000 jobs, beside the previous definition called directly in SQL on the same
    rows (no RPC on its side, so the ratio flatters the baseline): once the settled hours are folded
    (what the scheduler's reclaim keeps up), before any is, and the fold itself."""
    store = JobsStore(stack.settings(), timeout_s=120)  # as `stats` makes it: a first fold takes seconds
    figures = []
    with stack.postgres_connection() as conn:
        conn.execute(_previous_job_stats())
    for shape, days in STATS_SHAPES.items():
        with stack.postgres_connection() as conn:
            conn.execute("truncate jobs cascade")  # unfolds every hour too
            conn.execute(POPULATE_STATS, {"user": stack.create_user(), "rows": STATS_ROWS, "days": days})
            conn.execute("vacuum analyze jobs")
            conn.execute("vacuum analyze job_attempts")
        before = []
        with stack.postgres_connection() as conn:
            conn.execute("select public.sona_bench_previous_job_stats(24)")  # the first call plans it
            for _ in range(runs):
                started = time.perf_counter()
                conn.execute("select public.sona_bench_previous_job_stats(24)").fetchall()
                before.append(time.perf_counter() - started)
        unfolded = _time_stats(store, runs)
        started = time.perf_counter()
        if fold_settled_hours(store, budget_s=600) is not None:
            raise RuntimeError("the settled hours were not all folded")
        fold = [time.perf_counter() - started]
        folded = _time_stats(store, runs)
        baseline = "the previous job_stats()"
        figures += [
            Figure(f"job_stats(), 24 h: {shape}", folded, before, "s", baseline, "one call, < 1 s"),
            Figure(f"  the same, no hour folded yet: {shape}", unfolded, before, "s", baseline, "-"),
            Figure(f"  folding every settled hour: {shape}", fold, before, "s", baseline, "once"),
        ]
    with stack.postgres_connection() as conn:
        conn.execute("truncate jobs cascade")
        conn.execute("drop function public.sona_bench_previous_job_stats(integer)")
    return figures


def _time_stats(store: JobsStore, runs: int) -> list[float]:
    store.stats(24)  # the first call in a session plans the function
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = store.stats(24)
        times.append(time.perf_counter() - started)
        if not result.get("total"):
            raise RuntimeError("job_stats(24) saw no jobs")
    return times


def run(runs: int, out: Path, burst_jobs: int = 1000, only: str | None = None) -> dict[str, Any]:
    python = production_python()
    path = os.environ.get("PATH", "/usr/bin:/bin")
    figures: list[Figure] = []
    trips = 0
    reclaim_parts: dict[str, list[float]] = {}
    dispatch: dict[str, Any] = {}
    wait: dict[str, Any] = {}
    triggers: dict[str, Any] = {}
    path_report: dict[str, Any] = {}
    throughput_detail: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sona-bench-") as tmp:
        work = Path(tmp)
        if only in (None, "job", "cold", "stats", "reclaim", "throughput"):
            env = {"LOG_LEVEL": "warning", "RECLAIM_BATCH_SIZE": "50"}
            with LocalStack(
                work / "stack", env=env, start_functions=False, with_relay=False, process_env={"PATH": path}
            ) as stack:
                if only in (None, "job", "cold"):
                    figures += cold_start(stack, work, runs, python)
                if only in (None, "job"):
                    figures += job_overhead_and_memory(stack, work, runs, python)
                if only in (None, "job", "throughput"):
                    figure, throughput_detail = throughput(stack, work, python, max(3, runs // 2))
                    figures.append(figure)
                if only in (None, "job", "reclaim"):
                    reclaim, trips, reclaim_parts = reclaim_at_scale(stack, runs)
                    figures.append(reclaim)
                if only in (None, "job", "stats"):
                    figures += job_stats_at_scale(stack, runs)
        if only in (None, "job", "path"):
            from devstack.bench import bench_path

            path_report = bench_path.run(work / "path", python, path, runs)
        if only in (None, "dispatch"):
            from devstack.bench import bench_dispatch

            dispatch = bench_dispatch.run(work, path, burst_jobs)
        if only in (None, "wait"):
            from devstack.bench import bench_wait

            wait = bench_wait.run(work, path, python)
        if only in (None, "triggers"):
            from devstack.bench import bench_triggers

            triggers = bench_triggers.run(work / "triggers")
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "runs": runs,
        "figures": [f.summary() for f in figures],
        "reclaim_round_trips": trips,
        "reclaim_parts": reclaim_parts,
        "dispatch": dispatch,
        "wait": wait,
        "triggers": triggers,
        "path": path_report,
        "throughput_detail": throughput_detail,
    }
    out.write_text(json.dumps(report, indent=2))
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'figure':<40} {'ours (median, min-max)':<28} {'baseline':<12} {'ratio':>7}  target",
        "-" * 108,
    ]
    for f in report["figures"]:
        unit = f["unit"]
        ours = f"{f['ours_median']:.3f} ({f['ours_min']:.3f}-{f['ours_max']:.3f}) {unit}"
        ratio = f"{f['ratio']:.2f}{'' if f['higher_is_better'] else 'x'}"
        lines.append(
            f"{f['name']:<40} {ours:<28} {f['baseline_median']:<8.3f}{unit:<4} {ratio:>7}  {f['target']}"
        )
        if f.get("pair_ratios"):
            pairs = ", ".join(f"{r:.2f}x" for r in f["pair_ratios"])
            lines.append(f"  each run beside its own baseline: {pairs} (worst {max(f['pair_ratios']):.2f}x)")
    lines.append(f"reclaim database round trips per call: {report['reclaim_round_trips']}")
    for part, seconds in report.get("reclaim_parts", {}).items():
        lines.append(f"  reclaim part: {part:<62} {statistics.median(seconds) * 1000:8.1f} ms (median)")
    if report.get("throughput_detail"):
        lines.append(throughput_lines(report["throughput_detail"]))
    if report.get("path"):
        from devstack.bench import bench_path

        lines.append(bench_path.table(report["path"]))
    if report.get("dispatch"):
        from devstack.bench import bench_dispatch

        lines.append(bench_dispatch.table(report["dispatch"]))
    if report.get("wait"):
        from devstack.bench import bench_wait

        lines.append(bench_wait.table(report["wait"]))
    if report.get("triggers"):
        from devstack.bench import bench_triggers

        lines.append(bench_triggers.table(report["triggers"]))
    return "\n".join(lines)


def throughput_lines(detail: dict[str, Any]) -> str:
    """Where a throughput job's time goes: its CPU by process, and its steps' medians; and the
    fastest drain that CPU allows, beside the ideal that leaves it out."""
    cpu = detail["cpu_ms_per_job"]
    steps = detail["median_step_ms"]
    waited = steps.get("encode_mp3", 0) - steps.get("encode_ffmpeg", 0) - steps.get("gain", 0)
    floor, ideal = detail["fastest_possible_s"], detail["ideal_s"]
    return (
        f"throughput, per job: CPU {cpu['function']} ms in the function's Python, {cpu['ffmpeg']} ms in"
        f" ffmpeg, {cpu['stand-ins']} ms in the local stand-ins; median steps (ms): "
        + ", ".join(f"{key} {value:g}" for key, value in steps.items())
        + f"; waiting for an encoder slot: {waited:g} ms"
        + f"\nthroughput, the fastest any schedule could drain the jobs with that CPU on {detail['cpus']}"
        f" CPUs: {floor:g} s, {ideal / floor:.2f} of the ideal at best"
    )


def main(runs: int, out: Path, burst_jobs: int = 1000, only: str | None = None) -> int:
    print(
        f"Benchmarking ({runs} runs each) on {os.cpu_count()} CPUs, Python {platform.python_version()}...",
        flush=True,
    )
    report = run(runs, out, burst_jobs, only)
    print(table(report))
    print(f"\nWritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(5, Path("bench-results.json")))
