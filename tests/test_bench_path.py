"""The path benchmark's arithmetic: one job's clocks become consecutive steps that add up to insert ->
completed, the runs' ratios come from their own baselines, the targets must hold in every run, and
the server's function counters become costs per job."""

from __future__ import annotations

import dataclasses

import pytest

from devstack.bench.bench_path import (
    JobClocks,
    Run,
    breakdown,
    insert_to_completed_ms,
    paired,
    path_steps,
    request_to_response_ms,
    table,
    trigger_costs,
    verdict,
)

WORKER_TIMINGS = {
    "claim": 10,
    "bucket": 0,
    "stage_generating": 8,
    "generate": 30,
    "stage_encoding": 7,
    "master": 15,
    "encode_mp3": 700,
    "encode_ffmpeg": 680,
    "gain": 15,
    "upload_wav": 250,
    "stage_uploading": 8,
    "upload_mp3": 40,
    "complete": 12,
    "total": 832,
}


def clocks(offset: float = 0.0, encode_ms: int = 700) -> JobClocks:
    """A job whose moments are 1000.000 s on (plus `offset`): 3 ms delivery, 9 ms door, 1 ms queue,
    and a worker that starts 8 ms after the dispatch and runs 820 ms up to the complete RPC."""
    timings = {**WORKER_TIMINGS, "encode_mp3": encode_ms}
    t0 = 1000.0 + offset
    worker_started = t0 + 0.021
    row_total_ms = 820 + encode_ms - 700
    completed_at = worker_started + row_total_ms / 1000
    return JobClocks(
        job_id="00000000-0000-0000-0000-000000000001",
        inserted=t0,
        door_received=t0 + 0.003,
        door_answered=t0 + 0.015,
        task_created=t0 + 0.012,
        dispatched=t0 + 0.013,
        worker_answered=completed_at + 0.020,
        completed_at=completed_at,
        notified=completed_at + 0.006,
        row_total_ms=row_total_ms,
        timings_ms=timings,
    )


def test_the_steps_add_up_to_insert_to_completed() -> None:
    job = clocks()
    steps = dict(path_steps(job))
    assert sum(steps.values()) == pytest.approx(insert_to_completed_ms(job))
    assert insert_to_completed_ms(job) == pytest.approx(847.0)


@pytest.mark.parametrize(
    ("step", "ms"),
    [
        ("delivery: insert's COMMIT returned -> the door receives the webhook", 3.0),
        ("door: webhook -> task created", 9.0),
        ("queue: task created -> dispatched to the worker", 1.0),
        ("dispatch: Cloud Run's front -> the worker's request starts", 8.0),
        ("MP3 preview: encoder slot, the encode with the loudness, the gain", 700.0),
        ("complete RPC to its commit (the NOTIFY)", 6.0),
    ],
)
def test_each_step_is_read_from_its_own_clock(step: str, ms: float) -> None:
    assert dict(path_steps(clocks()))[step] == pytest.approx(ms)


def test_what_no_clock_names_is_shown_as_the_time_between_the_worker_steps() -> None:
    # 820 ms up to the complete RPC, of which claim..upload_mp3 name 10+0+8+30+15+700+40 = 803.
    between = dict(path_steps(clocks()))["worker: between the steps (waits for what runs beside, Python)"]
    assert between == pytest.approx(17.0)


def test_request_to_response_is_cloud_tasks_own_dispatch_to_answer() -> None:
    job = clocks()
    assert request_to_response_ms(job) == pytest.approx((job.worker_answered - job.dispatched) * 1000)


def test_the_breakdown_gives_each_step_its_median_range_and_share_of_the_median_path() -> None:
    jobs = [clocks(0, 600), clocks(10, 700), clocks(20, 900)]
    rows = {row["step"]: row for row in breakdown(jobs)}
    encode = rows["MP3 preview: encoder slot, the encode with the loudness, the gain"]
    assert (encode["median_ms"], encode["min_ms"], encode["max_ms"]) == (700.0, 600.0, 900.0)
    assert encode["share"] == pytest.approx(700 / 847, abs=0.001)


def test_steps_beside_the_path_are_shown_without_a_share() -> None:
    rows = {row["step"]: row for row in breakdown([clocks()])}
    wav = rows["  beside the encode: upload wav"]
    assert wav["median_ms"] == 250.0
    assert wav["share"] is None


def test_a_step_the_worker_did_not_time_is_left_out_of_the_rows_beside_the_path() -> None:
    job = clocks()
    timings = {k: v for k, v in job.timings_ms.items() if k != "upload_wav"}
    without = dataclasses.replace(job, timings_ms=timings)
    assert not any("upload wav" in row["step"] for row in breakdown([without]))


def test_a_runs_ratios_are_its_medians_over_its_own_baseline_median() -> None:
    run = Run([900.0, 800.0, 1000.0], [850.0, 750.0, 950.0], [0.70, 0.80, 0.60, 0.75, 0.85], [0.8, 0.9, 0.7])
    figures = run.figures()
    assert figures["ffmpeg_alone_ms"] == pytest.approx(750.0)
    assert figures["ratio_path"] == pytest.approx(900 / 750, abs=0.001)
    assert figures["ratio_response"] == pytest.approx(850 / 750, abs=0.001)


def test_the_jobs_own_audio_step_alone_is_shown_over_the_same_baseline() -> None:
    figures = Run([900.0], [850.0], [0.70, 0.80, 0.75], [0.84, 0.78, 0.90]).figures()
    assert figures["job_audio_alone_ms"] == pytest.approx(840.0)
    assert figures["ratio_job_audio"] == pytest.approx(840 / 750, abs=0.001)


@pytest.mark.parametrize(
    ("ratios", "held"),
    [
        ([(1.20, 1.05), (1.25, 1.10)], (True, True)),
        ([(1.20, 1.05), (1.26, 1.05)], (False, True)),
        ([(1.20, 1.11), (1.10, 1.02)], (True, False)),
    ],
    ids=["both-held", "one-run-over-on-the-path", "one-run-over-on-the-request"],
)
def test_a_target_holds_only_when_it_holds_in_every_run(
    ratios: list[tuple[float, float]], held: tuple[bool, bool]
) -> None:
    runs = [{"ratio_path": path, "ratio_response": response} for path, response in ratios]
    result = verdict(runs)
    assert (result["path_within_target_every_run"], result["response_within_target_every_run"]) == held


def test_server_function_costs_are_the_differences_per_job_slowest_first() -> None:
    before = {"complete_job": (10, 30.0, 20.0, False), "jobs_guard": (60, 6.0, 6.0, True)}
    after = {
        "complete_job": (12, 36.0, 24.0, False),
        "jobs_guard": (72, 7.2, 7.2, True),
        "sona_stats_unfold": (4, 8.0, 8.0, True),
        "untouched": (5, 1.0, 1.0, False),
    }
    rows = trigger_costs({**before, "untouched": (5, 1.0, 1.0, False)}, after, jobs=2)
    assert [r["function"] for r in rows] == ["sona_stats_unfold", "complete_job", "jobs_guard"]
    assert rows[1] == {
        "function": "complete_job",
        "kind": "function",
        "calls_per_job": 1.0,
        "total_ms_per_job": 3.0,
        "self_ms_per_job": 2.0,
    }
    assert rows[2]["kind"] == "trigger" and rows[2]["calls_per_job"] == 6.0


def test_the_table_shows_every_run_beside_its_baseline_the_verdict_and_the_breakdown() -> None:
    run = Run([900.0], [880.0], [0.75] * 5, [0.8] * 5).figures()
    report = {
        "jobs_per_run": 1,
        "runs": [run],
        "verdict": verdict([run]),
        "breakdown": breakdown([clocks()]),
        "server_functions": trigger_costs({}, {"claim_job": (1, 1.5, 1.0, False)}, jobs=1),
    }
    text = table(report)
    assert "| 1 | 0.900 s | 0.880 s | 0.750 s | 1.20x | 1.17x | 0.800 s | 1.07x |" in text
    assert "insert -> completed <= 1.25x in every run: met" in text
    assert "request -> response <= 1.1x in every run: NOT met" in text
    assert "| door: webhook -> task created | 9.0 ms | 9.0-9.0 | 1.1 % |" in text
    assert "| claim_job | function | 1 | 1.500 ms | 1.000 ms |" in text


def test_each_job_is_paired_with_an_encode_taken_before_and_after_it_in_turn() -> None:
    order: list[str] = []

    def job() -> JobClocks:
        order.append("job")
        return clocks()

    def encode() -> tuple[float, float]:
        order.append("encode")
        return 0.7, 0.75

    jobs, encodes = paired(job, encode, 4)
    assert order == ["encode", "job", "job", "encode", "encode", "job", "job", "encode"]
    assert len(jobs) == 4 and encodes == [(0.7, 0.75)] * 4
