"""`python -m devstack bench --only wait`: what waiting for a Stable Audio 3 generation costs.

Stable Audio 3 answers a generation's id at once and makes the audio in 10-40 s (issue 22). The wait
can be spent polling inside the attempt (one invocation holds an instance for the whole wait and
asks the provider every GENERATION_POLL_MS), or by leaving and having a scheduled task check back
(each check is a task, an invocation, a claim, one provider GET and a release). This runs one
process_job per poll interval, each serving the same mix of generation times at once (so the whole
run lasts about as long as the longest generation), and reports per job: the instance time the
invocation held, the provider GETs, the tasks, and how late the audio was fetched after it was
ready. The check-back figures are built from the same run's measured pieces (a claim's and a
provider GET's time), since the design it would need (a release that does not use up an attempt)
is not built.
"""

from __future__ import annotations

import math
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from devstack.stack import FunctionProcess, LocalStack
from sona.models import webhook_payload

POLL_INTERVALS_S = (1.0, 2.0, 5.0)
# The realistic range, about 10 to 40 s, at lengths no poll interval divides evenly.
GENERATION_S = (11.3, 23.7, 38.9)
CHECK_BACK_S = 10.0  # a check-back design's interval (shorter buys latency with more tasks)
MODEL = "stable-audio-3"


def _deliver(url: str, secret: str, job_id: uuid.UUID) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    response = requests.post(
        url, json=webhook_payload(job_id), timeout=300, headers={"X-Webhook-Secret": secret}
    )
    answer = dict(response.json())
    if answer.get("outcome") != "completed":
        raise RuntimeError(f"benchmark job did not complete: {answer}")
    return answer, time.perf_counter() - started


def _get_ms(stack: LocalStack, generation_id: str, runs: int = 20) -> float:
    """One provider GET answering in-progress, as a check-back would make it (median ms)."""
    assert stack.double is not None
    headers = {"authorization": f"Bearer {stack.double.api_key}", "accept": "audio/*"}
    times = []
    with requests.Session() as session:
        for _ in range(runs):
            started = time.perf_counter()
            session.get(f"{stack.double.v3_url}/results/{generation_id}", headers=headers, timeout=10)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run(work: Path, path: str, python: str) -> dict[str, Any]:
    env = {"LOG_LEVEL": "warning", "STABLE_AUDIO_MODEL": MODEL, "DISPATCH": "direct"}
    with LocalStack(
        work / "wait-stack", env=env, start_functions=False, with_relay=False, process_env={"PATH": path}
    ) as stack:
        assert stack.double is not None
        double = stack.double
        functions = {
            interval: FunctionProcess(
                "process_job",
                stack.function_env(
                    GENERATION_POLL_MS=str(round(interval * 1000)), THREADS="4", MAX_CONCURRENT_JOBS="4"
                ),
                work / f"wait-{interval}.log",
                python=python,
            ).wait_ready()
            for interval in POLL_INTERVALS_S
        }
        try:
            # Warm each instance with an instant generation: the attempt's floor (claim, POST, one
            # GET, encode, upload, complete), and the claim's time a check-back would pay per check.
            floors = [
                _deliver(f.url, stack.webhook_secret, stack.insert_job("wait floor", 2))
                for f in functions.values()
            ]
            claim_ms = statistics.median(a["timings_ms"]["claim"] for a, _ in floors)
            floor_s = statistics.median(s for _, s in floors)
            jobs = [
                (interval, stack.insert_job(f"wait {interval}", 2))
                for interval in POLL_INTERVALS_S
                for _ in GENERATION_S
            ]
            double.generation_plan.extend(GENERATION_S * len(POLL_INTERVALS_S))
            started = time.perf_counter()
            with ThreadPoolExecutor(len(jobs)) as pool:
                futures = []
                for interval, job_id in jobs:  # one POST at a time: each job gets its planned length
                    posted = double.call_count
                    futures.append(
                        pool.submit(_deliver, functions[interval].url, stack.webhook_secret, job_id)
                    )
                    while double.call_count == posted:
                        time.sleep(0.005)
                answers = [f.result() for f in futures]
            total_s = time.perf_counter() - started
            rows = [
                _measured(stack, interval, job_id, answer, held)
                for (interval, job_id), (answer, held) in zip(jobs, answers, strict=True)
            ]
            double.generation_s = 60.0
            probe = _in_progress_id(stack)
            get_ms = _get_ms(stack, probe)
        finally:
            for function in functions.values():
                function.stop()
    return {
        "poll": rows,
        "floor_s": round(floor_s, 3),
        "claim_ms": round(claim_ms, 1),
        "get_ms": round(get_ms, 2),
        "check_back": _check_back(claim_ms, get_ms),
        "total_s": round(total_s, 1),
    }


def _in_progress_id(stack: LocalStack) -> str:
    """A generation that stays in progress, for timing the GET a check-back makes."""
    assert stack.double is not None
    headers = {"authorization": f"Bearer {stack.double.api_key}", "accept": "application/json"}
    files = {"prompt": (None, "wait probe"), "model": (None, MODEL), "duration": (None, "2")}
    answer = requests.post(
        f"{stack.double.v3_url}/stable-audio/text-to-audio", headers=headers, files=files, timeout=10
    )
    return str(answer.json()["id"])


def _measured(
    stack: LocalStack, interval: float, job_id: uuid.UUID, answer: dict[str, Any], _: float
) -> dict[str, Any]:
    assert stack.double is not None
    generation = stack.double.generations[str(stack.job(job_id)["generation_id"])]
    takes = generation.ready_at - generation.created
    waited = answer["timings_ms"]["generate"] / 1000
    return {
        "poll_interval_s": interval,
        "generation_s": takes,
        "held_s": round(waited, 2),  # instance time spent paying and waiting (the floor is apart)
        "gets": generation.asked,  # provider requests spent on waiting (and the one that fetched)
        "posts": 1,
        "tasks": 1,  # the one dispatch that runs the attempt (Cloud Tasks mode)
        "late_s": round(waited - takes, 2),  # audio ready -> audio fetched
    }


def _check_back(claim_ms: float, get_ms: float) -> list[dict[str, Any]]:
    """The check-back design for the same generation times: a task every CHECK_BACK_S, each an
    invocation that claims, GETs once and releases (a release costs about a claim)."""
    per_check_s = (2 * claim_ms + get_ms) / 1000
    rows = []
    for takes in GENERATION_S:
        checks = math.ceil(takes / CHECK_BACK_S)
        rows.append(
            {
                "generation_s": takes,
                "tasks": 1 + checks,
                "invocations": 1 + checks,
                "gets": checks,
                "held_waiting_s": round(checks * per_check_s, 3),
                "late_s_mean": CHECK_BACK_S / 2,
            }
        )
    return rows


def table(report: dict[str, Any]) -> str:
    lines = [
        "",
        f"waiting for stable-audio-3 ({report['total_s']} s in all;"
        f" an instant job's attempt {report['floor_s']} s,"
        f" a claim {report['claim_ms']} ms, a provider GET {report['get_ms']} ms)",
        f"{'design':<22} {'generation':>10} {'instance held':>14} {'provider GETs':>14}"
        f" {'tasks':>6} {'late':>7}",
    ]
    for row in report["poll"]:
        lines.append(
            f"{'poll every ' + format(row['poll_interval_s'], 'g') + ' s':<22} {row['generation_s']:>9.1f}s"
            f" {row['held_s']:>13.2f}s {row['gets']:>14} {row['tasks']:>6} {row['late_s']:>6.2f}s"
        )
    for row in report["check_back"]:
        lines.append(
            f"{'check back every ' + format(CHECK_BACK_S, 'g') + ' s':<22} {row['generation_s']:>9.1f}s"
            f" {row['held_waiting_s']:>13.3f}s {row['gets']:>14} {row['tasks']:>6}"
            f" ~{row['late_s_mean']:>5.1f}s"
        )
    return "\n".join(lines)
