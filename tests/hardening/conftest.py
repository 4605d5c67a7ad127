"""The hardening suite's stack (sentinel secrets, short deadlines) and its ledger of cases."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from devstack.doubles.stable_audio_double import Behaviour, StableAudioDouble
from devstack.events import WaitTimedOut
from devstack.stack import TERMINAL, LocalStack
from tests.support import LEDGER_KEY, RELAY_PAUSE_S, sql

SENTINELS = {
    "SUPABASE_SERVICE_ROLE_KEY": "sentinel-service-role-key-3c1e9a",
    "STABLE_AUDIO_API_KEY": "sk-sentinel-stability-key-8d72f0",
    "WEBHOOK_SECRET": "sentinel-webhook-secret-51ab04",
}
# JOB_TIMEOUT_MS=10 s with a 4 s margin: a 6 s job budget, so deadline cases take seconds, not minutes.
ENV = {
    # The webhook's own answer carries each case's outcome in direct mode; the Cloud Tasks path has
    # its own suite (tests/test_cloud_tasks_dispatch.py) over the same pipeline.
    "DISPATCH": "direct",
    "JOB_TIMEOUT_MS": "10000",
    "DEADLINE_MARGIN_MS": "4000",
    "MAX_RETRIES": "2",
    "RETRY_DELAY_MS": "50",
    "MAX_ATTEMPTS": "3",
    "RECLAIM_GRACE_S": "60",
    "LOG_LEVEL": "debug",
    "STABLE_AUDIO_API_KEY": SENTINELS["STABLE_AUDIO_API_KEY"],
    # The designer mode is served by Stable Audio 3 (asynchronous, by id); every other mode the cases
    # use by Stable Audio 2.5. The totals line reports each model apart.
    "DESIGNER_MODEL": "stable-audio-3",
    # The producer mode by TangoFlux on Replicate (by id, as Stable Audio 3; its double stands in).
    "PRODUCER_MODEL": "tangoflux",
    "GENERATION_POLL_MS": "200",
}
MODELS = ("stable-audio-2.5", "stable-audio-3", "tangoflux")
JOB_BUDGET_S = 6.0
# The suite runs as two parts: the folder's own group (tests/conftest.py: group_of), and the files
# that name this one. Under xdist each part runs whole on a worker of its own, with its own stack
# and ledger, beside the other: its cases wait out deadlines for seconds each, and as one group the
# suite alone took most of the whole run's time. test_totals.py judges each part where it ran; the
# controller merges the two ledgers into one summary.
FAULTS_PART = "hardening-faults"


@dataclass
class Ledger:
    """Every case tried, and what the totals line reports."""

    bad_inputs: list[tuple[str, str]] = field(default_factory=list)
    faults: list[tuple[str, str]] = field(default_factory=list)
    jobs: set[uuid.UUID] = field(default_factory=set)
    paid: dict[uuid.UUID, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[uuid.UUID, int] = field(default_factory=lambda: defaultdict(int))
    responses: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    lost: list[uuid.UUID] = field(default_factory=list)
    # Why a job was paid for more than once, for the cases no client can avoid (the provider
    # charges for a generation it finished even if its bytes never arrived whole).
    why_paid_again: dict[uuid.UUID, str] = field(default_factory=dict)
    # The model that served each job (stable-audio-2.5 unless a case says otherwise).
    models: dict[uuid.UUID, str] = field(default_factory=dict)

    @property
    def duplicate_paid(self) -> int:
        return sum(max(0, n - 1) for n in self.paid.values())

    def unexplained_duplicates(self) -> dict[uuid.UUID, int]:
        return {job: n for job, n in self.paid.items() if n > 1 and job not in self.why_paid_again}

    def as_data(self) -> dict[str, Any]:
        """What the totals and the case lines need, in plain types: a worker hands its part to the
        controller (execnet carries no UUIDs), which merges the parts (add) into one summary."""
        return {
            "bad_inputs": self.bad_inputs,
            "faults": self.faults,
            "jobs": [str(j) for j in self.jobs],
            "lost": [str(j) for j in self.lost],
            "leaked": self.leaked,
            "paid": {str(j): n for j, n in self.paid.items()},
            "why_paid_again": {str(j): why for j, why in self.why_paid_again.items()},
            "models": {str(j): model for j, model in self.models.items()},
        }

    def add(self, data: dict[str, Any]) -> None:
        """Book another worker's part of the suite (as_data) here; its jobs are its own."""
        self.bad_inputs += [(name, outcome) for name, outcome in data["bad_inputs"]]
        self.faults += [(name, outcome) for name, outcome in data["faults"]]
        self.jobs |= {uuid.UUID(j) for j in data["jobs"]}
        self.lost += [uuid.UUID(j) for j in data["lost"]]
        self.leaked += data["leaked"]
        self.paid.update({uuid.UUID(j): n for j, n in data["paid"].items()})
        self.why_paid_again.update({uuid.UUID(j): why for j, why in data["why_paid_again"].items()})
        self.models.update({uuid.UUID(j): model for j, model in data["models"].items()})

    def totals(self) -> str:
        return (
            f"hardening totals: {len(self.bad_inputs)} bad inputs tried, {len(self.faults)} faults "
            f"injected, {len(self.lost)} jobs lost, {self._duplicates()}, {len(self.leaked)} secrets leaked"
        )

    def _duplicates(self) -> str:
        """One clause per model: how many generations were paid again there, and why."""
        return "; ".join(f"{model}: {self._duplicates_of(model)}" for model in MODELS)

    def _duplicates_of(self, model: str) -> str:
        jobs = {job for job in self.paid if self.models.get(job, MODELS[0]) == model}
        count = sum(max(0, self.paid[job] - 1) for job in jobs)
        text = f"{count} duplicate paid generation{'' if count == 1 else 's'}"
        reasons = Counter(
            why for job, why in self.why_paid_again.items() if job in jobs for _ in range(self.paid[job] - 1)
        )
        if not reasons:
            return text
        if len(reasons) == 1 and sum(reasons.values()) == count:
            return f"{text} ({next(iter(reasons))})"
        return f"{text} ({'; '.join(f'{n}: {why}' for why, n in reasons.items())})"


LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return LEDGER


@pytest.fixture(scope="session")
def hstack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    with LocalStack(
        tmp_path_factory.mktemp("hardening"),
        env=ENV,
        process_env={"PATH": "/usr/bin:/bin"},
        service_role_key=SENTINELS["SUPABASE_SERVICE_ROLE_KEY"],
        webhook_secret=SENTINELS["WEBHOOK_SECRET"],
        relay_pause_s=RELAY_PAUSE_S,
        database_server=pg_server,
    ) as stack:
        yield stack


@pytest.fixture
def stack(hstack: LocalStack) -> LocalStack:
    assert hstack.double is not None and hstack.relay is not None
    hstack.double.reset()
    hstack.relay.wait_idle()  # an earlier test's dropped deliveries are dropped by now
    hstack.relay.enabled = True
    hstack.gateway.faults.clear()
    return hstack


@pytest.fixture
def double(stack: LocalStack) -> StableAudioDouble:
    assert stack.double is not None
    return stack.double


def reclaim(stack: LocalStack) -> dict[str, Any]:
    response = requests.post(
        stack.reclaim_jobs_url, headers={"X-Webhook-Secret": stack.webhook_secret}, timeout=60
    )
    LEDGER.responses.append(response.text)
    return dict(response.json())


def settle(
    stack: LocalStack, job_id: uuid.UUID, prompt: str | None = None, *, rounds: int = 5
) -> dict[str, Any]:
    """Drive a job to completed or failed the way production would (the scheduler's reclaim, with
    time fast-forwarded in SQL), then book it: lost if it never ends, and how often it was paid."""
    LEDGER.jobs.add(job_id)
    row = _wait(stack, job_id, while_processing=False)
    for _ in range(rounds):
        if row["status"] in TERMINAL:
            break
        sql(
            stack.database_url,
            "update jobs set run_after = null, dispatched_at = null,"
            " created_at = now() - interval '1 hour', lease_expires_at = case when status ="
            " 'processing' then now() - interval '1 second' end where id = %s",
            job_id,
            role=None,
        )
        end_pause(stack)
        summary = reclaim(stack)
        row = _wait(stack, job_id, while_processing=summary.get("still_running", 0) > 0)
    if prompt is not None and stack.double is not None:
        mine = [c for c in stack.double.calls if _sent(c.fields.get("prompt"), prompt)]
        LEDGER.calls[job_id] = len(mine)
        LEDGER.paid[job_id] = sum(1 for c in mine if c.paid)
    if prompt is not None and stack.replicate is not None and LEDGER.models.get(job_id) == "tangoflux":
        # Replicate bills every prediction made, for the seconds it ran.
        made = [r for r in list(stack.replicate.made) if _sent(r.input.get("prompt"), prompt)]
        LEDGER.calls[job_id] = LEDGER.paid[job_id] = len(made)
    return row


def _sent(sent: object, prompt: str) -> bool:
    """A plug-in mode sends the prompt with its phrases after ". " (sona/job/modes.py)."""
    return isinstance(sent, str) and (sent == prompt or sent.startswith(f"{prompt}. "))


def end_pause(stack: LocalStack) -> None:
    """Time fast-forwarded past an open pause's end too: the next dispatch is its probe."""
    sql(stack.database_url, "update sona_pauses set until = now() where lifted_at is null", role=None)


def run_job(stack: LocalStack, label: str, script: list[Behaviour]) -> tuple[uuid.UUID, dict[str, Any]]:
    """One job through the stack with the provider scripted, settled to its end."""
    assert stack.double is not None
    stack.double.script(*script)
    prompt = f"{label} {uuid.uuid4().hex[:6]}"
    job_id = stack.insert_job(prompt, duration=2)
    row = settle(stack, job_id, prompt)
    stack.double.reset()  # what the script did not use must not leak into the next case
    return job_id, row


def check_end(row: dict[str, Any], status: str, attempts: int, message: str | None) -> None:
    assert (row["status"], row["attempts"]) == (status, attempts), row["error_message"]
    if message:
        assert message in row["error_message"]


def assert_recorded_in_time(stack: LocalStack, job_id: uuid.UUID) -> None:
    """Every attempt recorded its own end before the function's 10 s + 10 s timeout."""
    rows = sql(
        stack.database_url,
        "select extract(epoch from finished_at - started_at) as s"
        " from job_attempts where job_id = %s and finished_at is not null",
        job_id,
        role=None,
    )
    assert [float(r["s"]) for r in rows if float(r["s"]) >= JOB_BUDGET_S + 4] == []


def observe(stack: LocalStack, job_id: uuid.UUID) -> dict[str, Any]:
    """The row once the delivery in flight for it (if any) has been answered."""
    LEDGER.jobs.add(job_id)
    return _wait(stack, job_id, while_processing=False)


def _wait(stack: LocalStack, job_id: uuid.UUID, *, while_processing: bool) -> dict[str, Any]:
    """Wait out a delivery in flight (the relay's), or a dispatch reclaim stopped waiting for;
    either ends within the function's timeout, and then the row has its answer. Looked at again
    after each commit the stack's database reports; at the timeout, the row as it then is."""
    with psycopg.connect(stack.database_url, autocommit=True, row_factory=dict_row) as conn:

        def settled() -> dict[str, Any] | None:
            # pg_net keeps a request's queue row (uncommitted delete) until its whole batch has
            # ended. Looked at before the row, so a row read after its delivery ended is the answered
            # one. (Autocommit: each statement sees what has committed by then.)
            delivering = conn.execute(
                "select 1 from net.http_request_queue"
                " where convert_from(body, 'UTF8')::jsonb->'record'->>'id' = %s",
                (str(job_id),),
            ).fetchone()
            found = conn.execute("select * from public.jobs where id = %s", (job_id,)).fetchone()
            if found is None:
                raise KeyError(job_id)
            row = dict(found)
            running = while_processing and row["status"] == "processing"
            return None if delivering or running else row

        try:
            answered: dict[str, Any] = stack.wait_until(settled, JOB_BUDGET_S + 6, f"job {job_id}'s answer")
            return answered
        except WaitTimedOut:
            return stack.job(job_id)


def summary_lines(ledger: Ledger = LEDGER) -> list[str]:
    lines = [
        f"{kind}: {name} -> {outcome}"
        for kind, cases in (("bad input", ledger.bad_inputs), ("fault", ledger.faults))
        for name, outcome in cases
    ]
    return [*lines, ledger.totals()]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under xdist each part of the suite (PARTS) has a worker and a ledger of its own: hand this
    one to the controller, which merges them into one summary (tests/conftest.py), since this
    conftest's terminal summary runs only where it is loaded."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None and (LEDGER.bad_inputs or LEDGER.faults):
        output[LEDGER_KEY] = LEDGER.as_data()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not (LEDGER.bad_inputs or LEDGER.faults):
        return
    terminalreporter.section("hardening cases")
    for line in summary_lines():
        terminalreporter.write_line(line)
