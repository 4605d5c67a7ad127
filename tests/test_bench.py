"""The benchmark's arithmetic: ratios from medians, in the direction each target reads."""

from __future__ import annotations

import pytest

from devstack.bench.bench import (
    Figure,
    beside_its_baseline,
    fastest_possible_drain_s,
    table,
    throughput_lines,
)


def test_a_cost_ratio_is_ours_over_the_baseline() -> None:
    figure = Figure("job", [1.0, 3.0, 2.0], [1.0, 1.0, 1.0], "s", "ffmpeg", "<= 1.25x")
    assert figure.ratio == 2.0


def test_a_throughput_ratio_is_the_baseline_over_ours() -> None:
    figure = Figure("throughput", [12.5], [10.0], "s", "ideal", ">= 0.8", higher_is_better=True)
    assert figure.ratio == 0.8


def test_the_table_names_every_figure_with_median_min_max_and_target() -> None:
    figures = [Figure("cold start", [0.3, 0.2, 0.4], [0.1, 0.1, 0.2], "s", "bare", "<= 2.5x").summary()]
    text = table({"figures": figures, "reclaim_round_trips": 1})
    assert "cold start" in text
    assert "0.300 (0.200-0.400) s" in text
    assert "3.00x" in text
    assert "<= 2.5x" in text
    assert "round trips per call: 1" in text


def test_the_throughput_line_names_each_jobs_cpu_and_the_wait_for_an_encoder_slot() -> None:
    detail = {
        "cpu_ms_per_job": {"function": 55, "ffmpeg": 310, "stand-ins": 50},
        "median_step_ms": {"encode_mp3": 1000, "encode_ffmpeg": 380, "gain": 2, "generate": 2010},
        "ideal_s": 10.25,
        "cpus": 2,
        "fastest_possible_s": 12.1,
    }
    text = throughput_lines(detail)
    assert "CPU 55 ms in the function's Python, 310 ms in ffmpeg, 50 ms in the local stand-ins" in text
    assert "generate 2010" in text
    assert "waiting for an encoder slot: 618 ms" in text


def test_a_paired_figure_judges_each_run_against_the_baseline_measured_beside_it() -> None:
    # The medians give 2.0x; the second run took 3x the bare start measured right before it.
    figure = Figure("cold start", [0.2, 0.3, 0.4], [0.1, 0.1, 0.2], "s", "bare", "<= 2.0x", paired=True)
    summary = figure.summary()
    assert summary["pair_ratios"] == [2.0, 3.0, 2.0]
    assert "each run beside its own baseline: 2.00x, 3.00x, 2.00x (worst 3.00x)" in table(
        {"figures": [summary], "reclaim_round_trips": 1}
    )


def test_an_unpaired_figure_shows_no_pairs() -> None:
    summary = Figure("job", [1.0, 2.0], [1.0, 1.0], "s", "ffmpeg", "<= 1.25x").summary()
    assert summary["pair_ratios"] is None
    assert "beside its own baseline" not in table({"figures": [summary], "reclaim_round_trips": 1})


def test_the_table_shows_each_part_of_the_reclaim_by_its_median() -> None:
    parts = {
        "reclaim_and_dispatch() alone, in the database": [0.3, 0.1, 0.2],
        "  trigger jobs_guard": [0.004],
    }
    text = table({"figures": [], "reclaim_round_trips": 1, "reclaim_parts": parts})
    assert "reclaim part: reclaim_and_dispatch() alone, in the database" in text
    assert "200.0 ms (median)" in text
    assert "reclaim part:   trigger jobs_guard" in text
    assert "4.0 ms (median)" in text


def test_a_cold_starts_baseline_is_the_median_of_the_bare_starts_around_it() -> None:
    order: list[str] = []
    bare_timings = iter([(0.9, 0.5), (0.3, 0.2), (0.4, 0.1)])  # (wall, CPU) of each bare start

    def bare() -> tuple[float, float]:
        order.append("bare")
        return next(bare_timings)

    def ours() -> tuple[float, float]:
        order.append("ours")
        return (0.6, 0.5)

    timed, baseline = beside_its_baseline(ours, bare)
    assert order == ["bare", "ours", "bare", "bare"]
    assert timed == (0.6, 0.5)
    assert baseline == (0.4, 0.2)  # wall and CPU each take their own median


@pytest.mark.parametrize(
    ("jobs", "concurrency", "cpu_s_per_job", "cpus", "floor_s"),
    [
        pytest.param(40, 8, 0.0, 2, 10.0, id="no CPU: the waits alone, five rounds of 2 s"),
        pytest.param(8, 8, 0.45, 2, 3.8, id="one round: the wait, then every job's CPU over both CPUs"),
        pytest.param(
            40, 8, 0.45, 2, 12.7, id="five rounds: the first round's CPU, then four of wait and share"
        ),
        pytest.param(40, 8, 0.45, 4, 11.35, id="twice the CPUs: half the share"),
    ],
)
def test_the_fastest_possible_drain_adds_the_jobs_cpu_that_the_ideal_leaves_out(
    jobs: int, concurrency: int, cpu_s_per_job: float, cpus: int, floor_s: float
) -> None:
    assert fastest_possible_drain_s(jobs, concurrency, 2.0, cpu_s_per_job, cpus) == pytest.approx(floor_s)


def test_the_throughput_line_says_how_near_the_ideal_any_schedule_could_come() -> None:
    detail = {
        "cpu_ms_per_job": {"function": 52, "ffmpeg": 322, "stand-ins": 62},
        "median_step_ms": {"encode_mp3": 474, "encode_ffmpeg": 400, "gain": 3},
        "ideal_s": 10.25,
        "cpus": 2,
        "fastest_possible_s": 12.7,
    }
    assert "drain the jobs with that CPU on 2 CPUs: 12.7 s, 0.81 of the ideal at best" in throughput_lines(
        detail
    )
