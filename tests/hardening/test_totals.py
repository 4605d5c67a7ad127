"""The suite's verdict (runs last in each part of this folder, judging the part's own stack and
ledger: conftest.py FAULTS_PART): every job ended, none paid twice unless the case says why no
client could avoid it, no secret in any log line, response body or row; and the totals line the
terminal summary prints, duplicates and their reasons included."""

from __future__ import annotations

import pytest

from devstack.stack import TERMINAL, LocalStack
from tests.hardening.conftest import FAULTS_PART, SENTINELS, Ledger, end_pause, reclaim
from tests.support import sql

# Each part's floor: the bad inputs are the first part's, the provider, storage and database faults
# mostly the second's. In one process (no xdist) both parts share one ledger, judged twice.
FIRST, SECOND = "bad inputs, spend guards and Stable Audio 3", "provider, storage and database faults"
FLOORS = {FIRST: {"bad_inputs": 60, "faults": 10}, SECOND: {"bad_inputs": 0, "faults": 25}}
pytestmark = pytest.mark.parametrize(
    "part", [FIRST, pytest.param(SECOND, marks=pytest.mark.xdist_group(FAULTS_PART))]
)


def test_no_job_is_left_unfinished(stack: LocalStack, ledger: Ledger, part: str) -> None:
    """Jobs whose webhook the bad-request cases held back are lost deliveries: the next reclaims
    (time fast-forwarded past the grace period) must finish every one of them."""
    for _ in range(5):
        open_jobs = sql(
            stack.database_url, "select id from jobs where status not in ('completed', 'failed')", role=None
        )
        if not open_jobs:
            break
        sql(
            stack.database_url,
            "update jobs set created_at = now() - interval '1 hour', run_after = null,"
            " dispatched_at = null, lease_expires_at = case when status = 'processing'"
            " then now() - interval '1 second' end where status not in ('completed', 'failed')",
            role=None,
        )
        end_pause(stack)
        reclaim(stack)
    rows = sql(stack.database_url, "select id, status from jobs", role=None)
    ledger.jobs.update(r["id"] for r in rows)
    ledger.lost = [r["id"] for r in rows if r["status"] not in TERMINAL]
    assert ledger.lost == []


def test_no_generation_was_paid_twice_without_a_stated_reason(ledger: Ledger, part: str) -> None:
    assert ledger.unexplained_duplicates() == {}
    assert all(ledger.paid[job] <= 2 for job in ledger.why_paid_again)


def test_no_secret_leaked_into_logs_responses_or_rows(stack: LocalStack, ledger: Ledger, part: str) -> None:
    rows = sql(
        stack.database_url,
        """
        select coalesce(string_agg(t, E'\\n'), '') as text from (
          select to_jsonb(j)::text as t from jobs j
          union all select to_jsonb(a)::text from job_attempts a
          union all select to_jsonb(o)::text from storage.objects o) x""",
        role=None,
    )[0]["text"]
    haystacks = {
        "logs": "\n".join(f.output() for f in stack.functions.values()),
        "responses": "\n".join(ledger.responses),
        "rows": rows,
    }
    for where, text in haystacks.items():
        for name, secret in SENTINELS.items():
            if secret in text:
                ledger.leaked.append(f"{name} in {where}")
    assert ledger.leaked == []
    assert len(haystacks["logs"].splitlines()) > 100  # the scan saw the suite's whole output
    # The sentinels were live: the webhook transport (pg_net's queue here) did carry one.
    assert stack.relay is not None and stack.relay.delivered
    assert SENTINELS["WEBHOOK_SECRET"] in (stack.relay.delivered[0].request.headers or {}).values()


def test_the_totals_meet_the_floor(ledger: Ledger, part: str) -> None:
    floor = FLOORS[part]
    print(ledger.totals())
    assert len(ledger.bad_inputs) >= floor["bad_inputs"]
    assert len(ledger.faults) >= floor["faults"]
    assert (len(ledger.lost), len(ledger.unexplained_duplicates()), len(ledger.leaked)) == (0, 0, 0)
