"""The pause an account-level outage opens, in SQL: written once, no attempt used up, nothing claimed
or dispatched while it lasts, one probe after it, lifted by the probe's success."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

from tests.support import dispatched, insert_job, job_row, reclaimed, sql

MAX = 3


def reclaim(db_url: str) -> dict[str, Any]:
    return reclaimed(db_url, MAX, 0, 100, 10, 100)


def claim(db_url: str, job_id: uuid.UUID) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    token = uuid.uuid4()
    return token, sql(db_url, "select * from claim_job(%s, %s, 60, %s)", job_id, token, MAX)


def pause(db_url: str, job_id: uuid.UUID, token: uuid.UUID, seconds: int = 300) -> dict[str, Any]:
    (row,) = sql(
        db_url,
        "select * from pause_service(%s, %s, 'provider_out_of_credits', 'HTTP 402', "
        "'The audio service is unavailable right now.', %s)",
        job_id,
        token,
        seconds,
    )
    return row


def end_the_pause(db_url: str) -> None:
    """Time passes: the pause reaches its end, and so do the jobs it sent back to wait."""
    sql(db_url, "update sona_pauses set until = now() - interval '1 second' where lifted_at is null")
    sql(db_url, "update jobs set run_after = now() - interval '1 second' where run_after is not null")


def complete(db_url: str, job_id: uuid.UUID, token: uuid.UUID) -> None:
    sql(db_url, "select * from complete_job(%s, %s, 'w', 'm', '{}'::jsonb)", job_id, token)


def paused_service(db_url: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A pause opened by one job's outage, and a second job waiting behind it."""
    first, second = insert_job(db_url), insert_job(db_url)
    token, _ = claim(db_url, first)
    pause(db_url, first, token)
    return first, second


def test_many_instances_meeting_the_outage_at_once_write_one_pause_and_use_no_attempt(db_url: str) -> None:
    jobs = [insert_job(db_url) for _ in range(10)]
    tokens = [claim(db_url, j)[0] for j in jobs]
    start = Barrier(len(jobs))

    def one(pair: tuple[uuid.UUID, uuid.UUID]) -> dict[str, Any]:
        start.wait()
        return pause(db_url, *pair)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, zip(jobs, tokens, strict=True)))

    assert sum(a["pause_created"] for a in answers) == 1
    assert all(a["released"] for a in answers)
    (row,) = sql(db_url, "select * from sona_pauses")
    assert (row["code"], row["jobs_released"], row["lifted_at"]) == ("provider_out_of_credits", 10, None)
    rows = [job_row(db_url, j) for j in jobs]
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 0)}
    assert {r["run_after"] for r in rows} == {row["until"]}


def test_nothing_is_claimed_while_paused(db_url: str) -> None:
    _, second = paused_service(db_url)
    assert claim(db_url, second)[1] == []
    assert job_row(db_url, second)["status"] == "pending"


def test_after_the_pause_one_probe_goes_through_and_its_success_lifts_the_pause(db_url: str) -> None:
    first, second = paused_service(db_url)
    end_the_pause(db_url)
    probe_token, probe = claim(db_url, first)
    assert len(probe) == 1
    assert claim(db_url, second)[1] == []  # one probe at a time
    complete(db_url, first, probe_token)
    assert sql(db_url, "select lifted_by from sona_pauses") == [{"lifted_by": first}]
    assert len(claim(db_url, second)[1]) == 1


def test_a_probe_that_meets_the_outage_again_rearms_the_same_pause(db_url: str) -> None:
    first, second = paused_service(db_url)
    end_the_pause(db_url)
    token, _ = claim(db_url, first)
    answer = pause(db_url, first, token)
    assert (answer["pause_created"], answer["released"]) == (False, True)
    (row,) = sql(db_url, "select * from sona_pauses")
    assert (row["probe_job"], row["lifted_at"]) == (None, None)
    assert claim(db_url, second)[1] == []  # paused again
    assert job_row(db_url, first)["attempts"] == 0


def test_a_probe_that_fails_for_its_own_reason_lets_the_next_job_probe(db_url: str) -> None:
    first, second = paused_service(db_url)
    end_the_pause(db_url)
    token, _ = claim(db_url, first)
    sql(db_url, "select * from fail_job(%s, %s, 'bad prompt', false, 3, 10, 100)", first, token)
    assert len(claim(db_url, second)[1]) == 1


def test_reclaim_dispatches_nothing_while_paused_then_one_probe_then_everything(db_url: str) -> None:
    paused_service(db_url)
    for _ in range(3):
        insert_job(db_url)
    assert reclaim(db_url)["dispatch"] == []

    end_the_pause(db_url)
    sql(db_url, "update jobs set dispatched_at = null")
    (probe,) = dispatched(reclaim(db_url))
    token, _ = claim(db_url, probe)
    complete(db_url, probe, token)

    sql(db_url, "update jobs set dispatched_at = null")
    assert len(reclaim(db_url)["dispatch"]) == 4


def test_a_job_waiting_out_an_outage_too_long_fails_as_unavailable_not_as_its_own_fault(
    db_url: str,
) -> None:
    first, _ = paused_service(db_url)
    sql(db_url, "insert into sona_settings (key, value) values ('pause_max_wait_seconds', 0)")
    done = reclaim(db_url)
    # both waiting jobs: the one the outage sent back, and the one inserted while it lasted
    assert (done["failed"], done["dispatch"]) == (2, [])
    row = job_row(db_url, first)
    assert row["status"] == "failed"
    assert row["error_message"].startswith("The audio service was unavailable for too long")
    assert "nothing was wrong with your request" in row["error_message"]


def test_spend_stats_show_the_open_pause(db_url: str) -> None:
    paused_service(db_url)
    stats = sql(db_url, "select spend_stats(24) as s")[0]["s"]
    assert (stats["pause"]["code"], stats["pause"]["reason"]) == ("provider_out_of_credits", "HTTP 402")
    assert stats["pause"]["since"] is not None
    assert (stats["pauses_in_window"], stats["jobs_released_by_outages"]) == (1, 1)


def test_only_the_service_role_may_pause_or_read_the_pause(db_url: str) -> None:
    for role in ("anon", "authenticated"):
        rows = sql(
            db_url,
            "select has_function_privilege(%s, 'public.pause_service(uuid, uuid, text, text, text, integer)',"
            " 'execute') as fn, has_table_privilege(%s, 'public.sona_pauses', 'select') as tbl",
            role,
            role,
            role=None,
        )
        assert rows == [{"fn": False, "tbl": False}]
