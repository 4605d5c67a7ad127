"""`python -m devstack bench --only path`: one job as the musician feels it, insert to `completed`.

The stack runs as `dev` runs it (LocalStack: the pg_net relay with its real 1 s pause, the local
Cloud Tasks, Cloud Run's front checking the task's token) with the door process_job and the worker
run_job as functions-framework processes from the production venv, and an instant provider. Each
job is inserted as the plug-in's `generate` inserts it (service role, queued, designer, 60 s); its
completion is seen by a NOTIFY from a trigger the benchmark adds (the moment the completing
transaction commits, as Realtime would see it), never by polling.

Every step is read from a clock that already exists, all on this machine's wall clock:
- the insert's commit: the benchmark's clock right after COMMIT returns;
- the door receiving the webhook and answering it: the relay's record of each request;
- the task's creation and its dispatch to the worker, and the worker's answer: Cloud Tasks' records;
- the worker's own steps: the attempt's timings_ms (the worker's `sona_attempt` log line, which
  holds the complete RPC too), anchored on the server's `completed_at` minus the timings' total as
  the row has it (the total up to the complete RPC);
- the completion's commit: the NOTIFY;
- each RPC's and each trigger's time inside the server: pg_stat_user_functions (track_functions),
  read before and after the measured jobs.

The steps on the path add up to insert -> completed exactly: what no clock names is shown as such.
The baseline is ffmpeg alone encoding the same master WAV, once beside each job (five per run,
alternately just before and just after it), and each side's median makes the run's ratio, so the
ratio swings neither with one encode nor with the machine's speed drifting over the run. Beside each
baseline encode the job's own audio step runs alone too (sona.audio.master.encode_preview: the
encode with the loudness on a branch of the same ffmpeg run, then the gain), so the table says how
much of a run's ratio is the work the job asks of ffmpeg and how much is the rest of the path.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from devstack.emulators.cloud_tasks import Dispatch
from devstack.emulators.relay import Delivery
from devstack.events import Notifications
from devstack.stack import FunctionProcess, LocalStack
from sona.audio.ffmpeg import find_ffmpeg
from sona.audio.master import encode_preview
from sona.job.pipeline import ATTEMPT_EVENT

JOB_SECONDS = 60
PROMPT = "bench path"
# Jobs per run, each paired with an encode alone; each side's median makes the run's ratio (one encode
# swings by a quarter on a busy machine).
ENCODES_PER_RUN = 5
TARGET_PATH = 1.25  # insert -> completed over ffmpeg alone, in every run
TARGET_RESPONSE = 1.10  # the worker's request -> response over ffmpeg alone
DONE_CHANNEL = "sona_bench_job_done"

# The benchmark's own trigger: a NOTIFY when a job ends, delivered at the commit that ended it.
NOTIFY_DONE = f"""
create or replace function public.sona_bench_notify_done() returns trigger language plpgsql as $$
begin
  perform pg_notify('{DONE_CHANNEL}', new.id::text);
  return null;
end $$;
drop trigger if exists sona_bench_notify_done on public.jobs;
create trigger sona_bench_notify_done after update of status on public.jobs
  for each row when (new.status in ('completed', 'failed')) execute function public.sona_bench_notify_done();
"""

# Every function the server timed (track_functions = 'all'): the RPCs' state functions and the
# triggers they fire. Cumulative since the server started; the benchmark takes differences.
FUNCTION_STATS = """
select f.funcname, f.calls, f.total_time, f.self_time,
       exists (select from pg_trigger t where t.tgfoid = f.funcid and not t.tgisinternal
                and t.tgrelid in ('public.jobs'::regclass, 'public.job_attempts'::regclass)) as is_trigger
  from pg_stat_user_functions f where f.schemaname = 'public'
"""
# The RPCs a job makes (and how many of each), whose counts tell when every backend has flushed
# its statistics.
JOB_RPCS = {"claim_job": 1, "advance_stage": 3, "complete_job": 1}


def _rpc_counts(jobs: int) -> dict[str, int]:
    return {name: calls * jobs for name, calls in JOB_RPCS.items()}


# -- what one job's clocks say ----------------------------------------------------------------------
@dataclass(frozen=True)
class JobClocks:
    """One job's moments (epoch seconds) and the worker's own step timings (ms)."""

    job_id: str
    inserted: float  # COMMIT of the insert returned
    door_received: float  # the relay began sending the webhook
    door_answered: float  # the relay had the door's answer
    task_created: float  # Cloud Tasks created the task
    dispatched: float  # Cloud Tasks began its request to the worker
    worker_answered: float  # Cloud Tasks had the worker's answer
    completed_at: float  # the server's completed_at (now() of the completing transaction)
    notified: float  # the NOTIFY of the completing commit arrived
    row_total_ms: int  # timings_ms.total as the row has it: up to the complete RPC
    timings_ms: Mapping[str, int]  # the worker's log line: every step, the complete RPC included

    @property
    def worker_started(self) -> float:
        return self.completed_at - self.row_total_ms / 1000


# The worker's steps in the order they run, one after another (sona/job/pipeline.py).
WORKER_STEPS = (
    ("claim", "claim (RPC claim_job)"),
    ("bucket", "bucket check (once per instance)"),
    ("stage_generating", "stage generating (RPC advance_stage, the fence before paying)"),
    ("generate", "provider (instant double)"),
    ("master", "master cut"),
    ("encode_mp3", "MP3 preview: encoder slot, the encode with the loudness, the gain"),
    ("upload_mp3", "upload mp3 (last: it marks the output complete)"),
)
# What runs beside those steps (or inside one), shown for reading, not added to the path.
OVERLAPPED = (
    ("encode_ffmpeg", "  of which the ffmpeg run (encode, loudness on its branch), after a slot"),
    ("gain", "  of which the gain on the encoded frames"),
    ("stage_encoding", "  beside the master and the encode: stage encoding (RPC advance_stage)"),
    ("upload_wav", "  beside the encode: upload wav"),
    ("peaks", "  beside the encode: waveform peaks"),
    ("upload_peaks", "  beside the encode: upload peaks"),
    ("stage_uploading", "  beside the mp3 upload: stage uploading (RPC advance_stage)"),
    ("complete", "complete RPC as the worker timed it (to its answer)"),
)


# Timed from COMMIT's return on the client, so a delivery can show a few ms early (even negative):
# the relay is woken by the commit itself.
DELIVERY = "delivery: insert's COMMIT returned -> the door receives the webhook"


def path_steps(job: JobClocks) -> list[tuple[str, float]]:
    """The path from insert to completed as consecutive steps (ms) that add up to it exactly."""
    t = job.timings_ms
    steps = [
        (DELIVERY, job.door_received - job.inserted),
        ("door: webhook -> task created", job.task_created - job.door_received),
        ("queue: task created -> dispatched to the worker", job.dispatched - job.task_created),
        ("dispatch: Cloud Run's front -> the worker's request starts", job.worker_started - job.dispatched),
    ]
    steps = [(name, seconds * 1000) for name, seconds in steps]
    named = 0.0
    for key, name in WORKER_STEPS:
        steps.append((name, float(t.get(key, 0))))
        named += t.get(key, 0)
    steps.append(("worker: between the steps (waits for what runs beside, Python)", job.row_total_ms - named))
    steps.append(("complete RPC to its commit (the NOTIFY)", (job.notified - job.completed_at) * 1000))
    return steps


def insert_to_completed_ms(job: JobClocks) -> float:
    return (job.notified - job.inserted) * 1000


def request_to_response_ms(job: JobClocks) -> float:
    """The worker's request to its response, as Cloud Tasks saw it."""
    return (job.worker_answered - job.dispatched) * 1000


def breakdown(jobs: list[JobClocks]) -> list[dict[str, Any]]:
    """Each step's median over the jobs (with min and max) and its share of the median path; then
    the steps that overlap others, for reading only."""
    rows = []
    path = statistics.median(insert_to_completed_ms(j) for j in jobs)
    per_job = [path_steps(j) for j in jobs]
    for i, (name, _) in enumerate(per_job[0]):
        values = [steps[i][1] for steps in per_job]
        rows.append(_row(name, values, path, on_path=True))
    for key, name in OVERLAPPED:
        values = [float(j.timings_ms[key]) for j in jobs if key in j.timings_ms]
        if values:
            rows.append(_row(name, values, path, on_path=False))
    return rows


def _row(name: str, values: list[float], path_ms: float, *, on_path: bool) -> dict[str, Any]:
    median = statistics.median(values)
    return {
        "step": name,
        "median_ms": round(median, 1),
        "min_ms": round(min(values), 1),
        "max_ms": round(max(values), 1),
        "share": round(median / path_ms, 3) if on_path else None,
    }


@dataclass(frozen=True)
class Run:
    """One run: its jobs' two figures (ms), its own baseline's encodes (s), and the job's own audio
    step alone beside each of them (s)."""

    insert_to_completed_ms: list[float]
    request_to_response_ms: list[float]
    encodes_s: list[float]
    job_audio_alone_s: list[float]

    def figures(self) -> dict[str, float]:
        base = statistics.median(self.encodes_s) * 1000
        path = statistics.median(self.insert_to_completed_ms)
        response = statistics.median(self.request_to_response_ms)
        audio = statistics.median(self.job_audio_alone_s) * 1000
        return {
            "insert_to_completed_ms": round(path, 1),
            "request_to_response_ms": round(response, 1),
            "ffmpeg_alone_ms": round(base, 1),
            "ratio_path": round(path / base, 3),
            "ratio_response": round(response / base, 3),
            "job_audio_alone_ms": round(audio, 1),
            "ratio_job_audio": round(audio / base, 3),
        }


def verdict(runs: list[dict[str, float]]) -> dict[str, bool]:
    """The targets hold in every run, not in the median of them."""
    return {
        "path_within_target_every_run": all(r["ratio_path"] <= TARGET_PATH for r in runs),
        "response_within_target_every_run": all(r["ratio_response"] <= TARGET_RESPONSE for r in runs),
    }


FunctionStats = dict[str, tuple[int, float, float, bool]]  # name: calls, total ms, self ms, a trigger


def trigger_costs(before: FunctionStats, after: FunctionStats, jobs: int) -> list[dict[str, Any]]:
    """Per job, each function the server ran more of between the two readings: calls, and its own
    total time (what it calls included) and self time, in ms; the slowest first."""
    rows = []
    for name, (calls, total, own, is_trigger) in after.items():
        calls0, total0, own0, _ = before.get(name, (0, 0.0, 0.0, is_trigger))
        if calls == calls0:
            continue
        rows.append(
            {
                "function": name,
                "kind": "trigger" if is_trigger else "function",
                "calls_per_job": round((calls - calls0) / jobs, 2),
                "total_ms_per_job": round((total - total0) / jobs, 3),
                "self_ms_per_job": round((own - own0) / jobs, 3),
            }
        )
    return sorted(rows, key=lambda r: -r["total_ms_per_job"])


def _cells(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def table(report: dict[str, Any]) -> str:
    """The runs beside their baselines, then the breakdown and the server's functions (markdown)."""
    lines = [
        f"one {JOB_SECONDS} s stereo job through the stack, instant provider"
        f" ({report['jobs_per_run']} jobs per run, median; baseline: the median of as many"
        " ffmpeg-alone encodes of the same WAV, one beside each job; and beside each of those, the"
        " job's own audio step alone: its encode with the loudness, and the gain)",
        "",
        _cells("run", "insert -> completed", "request -> response", "ffmpeg alone", "ratio (insert)",
               "ratio (request)", "job's audio step alone", "its ratio"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for i, run in enumerate(report["runs"], 1):
        lines.append(
            _cells(
                str(i),
                f"{run['insert_to_completed_ms'] / 1000:.3f} s",
                f"{run['request_to_response_ms'] / 1000:.3f} s",
                f"{run['ffmpeg_alone_ms'] / 1000:.3f} s",
                f"{run['ratio_path']:.2f}x",
                f"{run['ratio_response']:.2f}x",
                f"{run['job_audio_alone_ms'] / 1000:.3f} s",
                f"{run['ratio_job_audio']:.2f}x",
            )
        )
    held = report["verdict"]
    lines += [
        "",
        f"targets: insert -> completed <= {TARGET_PATH}x in every run:"
        f" {'met' if held['path_within_target_every_run'] else 'NOT met'};"
        f" request -> response <= {TARGET_RESPONSE}x in every run:"
        f" {'met' if held['response_within_target_every_run'] else 'NOT met'}",
        "",
        _cells("step (insert -> completed, in order)", "median", "min-max", "share"),
        "|---|---:|---:|---:|",
    ]
    for row in report["breakdown"]:
        share = "" if row["share"] is None else f"{row['share'] * 100:.1f} %"
        spread = f"{row['min_ms']:.1f}-{row['max_ms']:.1f}"
        lines.append(_cells(row["step"], f"{row['median_ms']:.1f} ms", spread, share))
    if report.get("server_functions"):
        header = _cells("in the server, per job", "kind", "calls", "total", "self")
        lines += ["", header, "|---|---|---:|---:|---:|"]
        for row in report["server_functions"]:
            lines.append(
                _cells(
                    row["function"],
                    row["kind"],
                    f"{row['calls_per_job']:g}",
                    f"{row['total_ms_per_job']:.3f} ms",
                    f"{row['self_ms_per_job']:.3f} ms",
                )
            )
    return "\n".join(lines)


# -- running it ----------------------------------------------------------------------------------------
class Completions:
    """Each job's completion time: the arrival of the benchmark's NOTIFY, through the stack's own
    LISTEN thread (devstack/events.py). The stack's change events name only the table (one per
    transaction, so a 10,000-row reclaim sends one); this needs the job's id at its commit, so the
    benchmark adds its own row trigger for the two end statuses."""

    def __init__(self, database_url: str) -> None:
        self._seen: dict[str, float] = {}
        self._cond = threading.Condition()
        self._notes = Notifications(database_url, (DONE_CHANNEL,), self._note)

    def _note(self, channel: str, payload: str, arrived: float) -> None:
        with self._cond:
            self._seen[payload] = arrived
            self._cond.notify_all()

    def wait(self, job_id: uuid.UUID, timeout_s: float = 120) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: str(job_id) in self._seen, timeout_s):
                raise TimeoutError(f"job {job_id} did not end within {timeout_s} s")
            return self._seen[str(job_id)]

    def close(self) -> None:
        self._notes.close()


def _attempt_line(log: Path, job_id: uuid.UUID) -> dict[str, Any]:
    """The worker's sona_attempt line for the job (JSON logs)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if ATTEMPT_EVENT in line and str(job_id) in line:
            entry: dict[str, Any] = json.loads(line)
            if entry.get("event") == ATTEMPT_EVENT and entry.get("job_id") == str(job_id):
                return entry
    raise RuntimeError(f"no {ATTEMPT_EVENT} line for {job_id} in {log}")


def _function_stats(stack: LocalStack) -> FunctionStats:
    with stack.postgres_connection() as conn:
        rows = conn.execute(FUNCTION_STATS).fetchall()
    return {name: (int(n), float(total), float(own), bool(trigger)) for name, n, total, own, trigger in rows}


def _settled_stats(stack: LocalStack, expected: dict[str, int], timeout_s: float = 30) -> FunctionStats:
    """The statistics once every backend has flushed what the jobs did: a backend flushes when idle,
    at most once a second, else within 10 s (PostgreSQL's PGSTAT_IDLE_INTERVAL); the RPCs' known
    counts say when all have."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _function_stats(stack)
        if all(stats.get(name, (0, 0.0, 0.0, False))[0] >= count for name, count in expected.items()):
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"server statistics not flushed within {timeout_s} s: {expected}")
        time.sleep(0.5)


def _one_job(stack: LocalStack, completions: Completions, worker_log: Path) -> JobClocks:
    assert stack.relay is not None and stack.tasks is not None
    job_id = _insert(stack)
    inserted = time.time()
    notified = completions.wait(job_id)
    if not stack.tasks.wait_idle(60):  # the worker's answer too, so jobs never overlap
        raise RuntimeError("the task did not finish")
    row = stack.job(job_id)
    if row["status"] != "completed":
        raise RuntimeError(f"benchmark job ended {row['status']}: {row.get('error_message')}")
    with stack.postgres_connection() as conn:
        found = conn.execute(
            "select timings_ms from job_attempts where job_id = %s order by attempt desc limit 1", (job_id,)
        ).fetchone()
    assert found is not None
    delivery = _delivery(stack.relay.delivered, job_id)
    dispatch = _dispatch(stack.tasks.dispatches, job_id)
    return JobClocks(
        job_id=str(job_id),
        inserted=inserted,
        door_received=delivery.sent_at,
        door_answered=delivery.answered_at,
        task_created=dispatch.created,
        dispatched=dispatch.started,
        worker_answered=dispatch.finished,
        completed_at=row["completed_at"].timestamp(),
        notified=notified,
        row_total_ms=int(found[0]["total"]),
        timings_ms=dict(_attempt_line(worker_log, job_id)["timings_ms"]),
    )


def _insert(stack: LocalStack) -> uuid.UUID:
    return stack.insert_as_generate(PROMPT, JOB_SECONDS, "medium", "designer")


def _delivery(delivered: list[Delivery], job_id: uuid.UUID) -> Delivery:
    found = [d for d in delivered if (d.request.json_body() or {}).get("record", {}).get("id") == str(job_id)]
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} webhook deliveries for {job_id}")
    return found[0]


def _dispatch(dispatches: list[Dispatch], job_id: uuid.UUID) -> Dispatch:
    found = [d for d in dispatches if str(job_id) in d.task]
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} task attempts for {job_id}")
    return found[0]


def _master_wav(stack: LocalStack, job_id: uuid.UUID) -> Path:
    master: str = stack.job(job_id)["master_path"]
    return stack.root / "storage" / stack.settings().supabase_storage_bucket / master


def ffmpeg_alone(wav: Path, out: Path, times: int = ENCODES_PER_RUN) -> list[float]:
    """ffmpeg encoding the same WAV to 192k MP3 alone, `times` times (seconds each)."""
    command = [find_ffmpeg(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(wav),
               "-codec:a", "libmp3lame", "-b:a", "192k", str(out)]  # fmt: skip
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        subprocess.run(command, check=True)
        spent.append(time.perf_counter() - started)
    return spent


@contextmanager
def _functions(stack: LocalStack, work: Path, python: str) -> Iterator[Path]:
    """The door and the worker from the production venv, on the ports the stack wired; JSON logs at
    info, so the worker's sona_attempt line can be read."""
    env = stack.function_env(LOG_FORMAT="json", LOG_LEVEL="info")
    door = FunctionProcess("process_job", env, work / "door.log", stack.process_job_port, python=python)
    worker = FunctionProcess("run_job", env, work / "worker.log", stack.run_job_port, python=python)
    try:
        door.wait_ready()
        worker.wait_ready()
        yield worker.log_path
    finally:
        door.send_signal(15)
        worker.stop()
        door.stop()


def job_audio_alone(wav: bytes, bitrate: str) -> float:
    """The job's own audio step on the same master, alone (seconds): the worker's encode_preview,
    the one ffmpeg run with the loudness on its branch, then the gain."""
    ffmpeg = find_ffmpeg()
    started = time.perf_counter()
    encode_preview(wav, bitrate, ffmpeg)
    return time.perf_counter() - started


J = TypeVar("J")
E = TypeVar("E")


def paired(job: Callable[[], J], encode: Callable[[], E], pairs: int) -> tuple[list[J], list[E]]:
    """Each job beside an encode of its own, taken next to it in turn (encode first, then job
    first), so that the ratio pairs figures of the same minute: a machine whose speed drifts over
    a run (this one's encode alone swings by a quarter) moves both sides alike, and neither side
    always runs in the wake of the other."""
    jobs, encodes = [], []
    for i in range(pairs):
        if i % 2:
            jobs.append(job())
            encodes.append(encode())
        else:
            encodes.append(encode())
            jobs.append(job())
    return jobs, encodes


def run(work: Path, python: str, path: str, runs: int, jobs_per_run: int = ENCODES_PER_RUN) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    with LocalStack(
        work / "stack", start_functions=False, process_env={"PATH": path}, env={"LOG_LEVEL": "info"}
    ) as stack:
        with stack.postgres_connection() as conn:
            conn.execute(NOTIFY_DONE)
            conn.execute("alter system set track_functions = 'all'")
            conn.execute("select pg_reload_conf()")
        completions = Completions(stack.database_url)
        try:
            with _functions(stack, work, python) as worker_log:
                warm = _one_job(stack, completions, worker_log)  # imports, clients, the double's cache
                wav = _master_wav(stack, uuid.UUID(warm.job_id))
                bitrate = stack.settings().mp3_bitrate
                master = wav.read_bytes()  # once: the pairs time the audio step, not this read

                def baselines() -> tuple[float, float]:
                    alone = ffmpeg_alone(wav, work / "alone.mp3", times=1)[0]
                    return alone, job_audio_alone(master, bitrate)

                # The warm-up's calls flushed first, so that none of them lands in the difference.
                before = _settled_stats(stack, _rpc_counts(1))
                jobs: list[JobClocks] = []
                results = []
                for _ in range(runs):
                    mine, beside = paired(
                        lambda: _one_job(stack, completions, worker_log), baselines, jobs_per_run
                    )
                    jobs += mine
                    results.append(
                        Run(
                            [insert_to_completed_ms(j) for j in mine],
                            [request_to_response_ms(j) for j in mine],
                            [alone for alone, _ in beside],
                            [audio for _, audio in beside],
                        )
                    )
                after = _settled_stats(stack, _rpc_counts(1 + len(jobs)))
        finally:
            completions.close()
    figures = [r.figures() for r in results]
    return {
        "jobs_per_run": jobs_per_run,
        "encodes_per_run": jobs_per_run,
        "runs": figures,
        "runs_raw": [asdict(r) for r in results],
        "verdict": verdict(figures),
        "breakdown": breakdown(jobs),
        "server_functions": trigger_costs(before, after, len(jobs)),
        "jobs": [{**asdict(j), "timings_ms": dict(j.timings_ms)} for j in jobs],
    }
