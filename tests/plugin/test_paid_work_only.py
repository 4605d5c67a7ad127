"""Issue 29: a job is generated only when it was paid for. Each test is one attack, made as the
attacker makes it: through the local gateway with a user's token or the anon key where the gateway
serves the request (inserts, updates, reads, RPC), else the very statement PostgREST would run (one
transaction, `set local role`, `request.jwt.claims` set). Each got through on main before
20261207000100_paid_work_only.sql; each now meets a refusal, and the balance and the provider's
call count say nothing was given away."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from devstack.doubles.stable_audio_double import Behaviour
from devstack.emulators.gateway import Gateway
from devstack.emulators.user_jwt import make_user_jwt
from devstack.stack import LocalStack
from tests.plugin.conftest import _gateway as gateway_over
from tests.plugin.generate import GenerateRequest, generate_over_sql, generate_through_gateway
from tests.plugin.plugin_db import (
    AUDIO_BUCKET,
    COMPLETED_CREATOR,
    MUSICIAN,
    START_BALANCE,
    balance,
    build_plugin_database,
    showcase,
    store_plugin_audio,
    transactions,
)
from tests.support import RELAY_PAUSE_S, new_user, sql, wait_until, wav_bytes
from tests.test_reclaim import reclaim

BONUS = 500
CHEAP = GenerateRequest("door slam in a stairwell", 1, "low", "designer")  # 6 tokens


@contextmanager
def as_postgrest(url: str, role: str, user: uuid.UUID | None = None) -> Iterator[psycopg.Connection[Any]]:
    """One request as PostgREST runs it: a transaction, `set local role`, the JWT's claims."""
    with psycopg.connect(url, row_factory=dict_row) as conn, conn.transaction():
        conn.execute(f"set local role {role}")  # type: ignore[arg-type]
        claims = {"role": role, **({"sub": str(user)} if user else {})}
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn


def user_headers(gateway: Gateway, user: uuid.UUID) -> dict[str, str]:
    """What supabase-js sends for a signed-in user: the publishable key and the user's token."""
    token = make_user_jwt(gateway.jwt_secret, user)
    return {
        "apikey": gateway.publishable_key,
        "Authorization": f"Bearer {token}",
        "Prefer": "return=representation",
    }


def anon_headers(gateway: Gateway) -> dict[str, str]:
    """Signed out: supabase-js sends the anon key in both headers."""
    return {"apikey": gateway.anon_key, "Authorization": f"Bearer {gateway.anon_key}"}


def service_headers(gateway: Gateway) -> dict[str, str]:
    return {"apikey": gateway.service_role_key, "Authorization": f"Bearer {gateway.service_role_key}"}


def insert_as_user(gateway: Gateway, user: uuid.UUID, **row: Any) -> requests.Response:
    body = {"user_id": str(user), "prompt": "door slam in a stairwell", "duration": 1, "quality": "low",
            "mode": "designer", "status": "queued", **row}  # fmt: skip
    return requests.post(
        f"{gateway.url}/rest/v1/jobs", json=body, headers=user_headers(gateway, user), timeout=30
    )


def patch_as_user(gateway: Gateway, user: uuid.UUID, job: object, **change: Any) -> requests.Response:
    """supabase-js's `.from('jobs').update(change).eq('id', job)` with the user's token."""
    url = f"{gateway.url}/rest/v1/jobs?id=eq.{job}"
    return requests.patch(url, json=change, headers=user_headers(gateway, user), timeout=30)


def cancel_as_user(gateway: Gateway, user: uuid.UUID, job: uuid.UUID) -> requests.Response:
    return requests.post(
        f"{gateway.url}/rest/v1/rpc/cancel_job",
        json={"p_job_id": str(job)},
        headers=user_headers(gateway, user),
        timeout=30,
    )


def refusal(answer: requests.Response) -> tuple[int, str, str | None]:
    body = answer.json()
    return answer.status_code, body.get("code"), body.get("hint")


@pytest.fixture
def refunds_gateway_db(plugin_refunds_db_url: str, tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    """The plug-in's schema (no rows) with every migration, and the gateway over it."""
    gw = gateway_over(plugin_refunds_db_url, tmp_path / "storage")
    gw.start()
    yield gw, plugin_refunds_db_url
    gw.stop()


@pytest.fixture
def plugin_gateway_db(plugin_migrated_db_url: str, tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    """The plug-in's schema and rows with every migration, and the gateway over it."""
    gw = gateway_over(plugin_migrated_db_url, tmp_path / "storage")
    gw.start()
    yield gw, plugin_migrated_db_url
    gw.stop()


# ---------------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("paid-work-stack")
    env = {"RECLAIM_GRACE_S": "0"}
    with LocalStack(
        root,
        env=env,
        before_migrations=build_plugin_database,
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
    ) as running:
        store_plugin_audio(running.gateway, running.database_url, wav_bytes(0.5))
        settle(running)  # the plug-in's own waiting rows run first, so each test counts only its own calls
        yield running


def settle(stack: LocalStack) -> None:
    """Every delivery and task finished, then one reclaim (which also deletes what is due)."""
    assert stack.relay is not None
    stack.relay.wait_idle()
    if stack.tasks is not None:
        assert stack.tasks.wait_idle(60)
    reclaim(stack)
    if stack.tasks is not None:
        assert stack.tasks.wait_idle(60)


def stored_names(stack: LocalStack, like: str) -> list[str]:
    rows = sql(
        stack.database_url,
        "select name from storage.objects where name like %s order by name",
        like,
        role=None,
    )
    return [r["name"] for r in rows]


@pytest.mark.slow
def test_attack_1_a_users_own_queued_insert_is_refused_and_never_generated(stack: LocalStack) -> None:
    assert stack.double is not None
    user = stack.create_user()
    calls = stack.double.call_count
    answer = insert_as_user(stack.gateway, user)
    assert refusal(answer) == (400, "SQ004", "sona_unpaid_insert")
    assert "generate function" in answer.json()["message"]
    settle(stack)
    assert balance(stack.database_url, user) == BONUS
    assert stack.double.call_count == calls
    assert sql(stack.database_url, "select id from jobs where user_id = %s", user, role=None) == []


@pytest.mark.slow
def test_attack_2_anon_cannot_clear_every_musicians_paths_and_no_file_is_deleted(stack: LocalStack) -> None:
    before = stored_names(stack, "generated/%")
    assert before  # the plug-in's rows' audio
    answer = requests.post(
        f"{stack.supabase_url}/rest/v1/rpc/cleanup_expired_audio_paths",
        json={"expiration_hours": 0, "batch_limit": 1000},
        headers=anon_headers(stack.gateway),
        timeout=30,
    )
    assert (answer.status_code, answer.json()["code"]) == (401, "42501")
    settle(stack)
    assert stored_names(stack, "generated/%") == before
    paths = sql(stack.database_url, "select count(*) as n from jobs where master_path is not null", role=None)
    assert paths[0]["n"] >= 3


@pytest.mark.slow
def test_attack_7_files_stored_for_a_job_cancelled_during_generation_are_deleted(stack: LocalStack) -> None:
    assert stack.double is not None
    user = stack.create_user()
    stack.double.script(Behaviour("ok", delay_s=2.0))
    calls = stack.double.call_count
    answer = generate_through_gateway(stack.gateway, user, CHEAP)
    assert answer.status == 201 and answer.job is not None, answer.error
    job = uuid.UUID(answer.job["id"])
    wait_until(lambda: stack.double is not None and stack.double.call_count == calls + 1, 60)
    assert cancel_as_user(stack.gateway, user, job).json()[0]["status"] == "cancelled"
    wait_until(lambda: stack.double is not None and stack.double.calls[-1].finished is not None, 60)
    wait_until(lambda: stored_names(stack, f"%{job}%") != [], 60)  # the worker stores the paid audio
    wait_until(
        lambda: sql(stack.database_url, "select count(*) as n from sona_storage_garbage where name like %s",
                    f"%{job}%", role=None)[0]["n"] == 3,
        60,
    )  # fmt: skip
    settle(stack)
    assert stored_names(stack, f"%{job}%") == []
    assert stack.job(job)["status"] == "cancelled"
    assert balance(stack.database_url, user) == BONUS - CHEAP.cost()  # the call was made: kept


# ---------------------------------------------------------------------------- as PostgREST runs it
def test_attack_1_backdated_inserts_cannot_dodge_the_daily_quota_without_token_tables(
    plugin_refunds_db_url: str, tmp_path: Path
) -> None:
    """The earlier worker's clients (no token tables) under the plug-in's permissive policies: the
    quota counts by the server's clock, which a user can neither set at insert nor change later."""
    url = plugin_refunds_db_url
    no_tokens = (
        "drop trigger trigger_grant_beta_bonus on auth.users; drop table token_transactions, user_tokens"
    )
    sql(url, no_tokens, role=None)
    sql(url, "insert into sona_settings (key, value) values ('max_jobs_per_day', 2), ('max_active_jobs', 10)")
    user = new_user(url)
    gateway = gateway_over(url, tmp_path / "storage")
    gateway.start()
    try:
        backdated = [insert_as_user(gateway, user, created_at="2020-01-01T00:00:00Z") for _ in range(4)]
        honest = [insert_as_user(gateway, user) for _ in range(3)]
        first = honest[0].json()[0]["id"]
        backdate = patch_as_user(gateway, user, first, created_at="2020-01-01T00:00:00Z")
    finally:
        gateway.stop()
    assert {refusal(a) for a in backdated} == {(403, "42501", "sona_schedule_protected")}
    assert [a.status_code for a in honest[:2]] == [201, 201]
    assert refusal(honest[2])[:2] == (400, "SQ002")
    assert refusal(backdate) == (403, "42501", "sona_request_frozen")
    days = sql(
        url, "select count(*) as n from jobs where created_at > now() - interval '24 hours'", role=None
    )
    assert days == [{"n": 2}]


def test_attack_3_an_old_charge_cannot_be_minted_into_tokens(plugin_gateway_db: tuple[Gateway, str]) -> None:
    gateway, url = plugin_gateway_db
    with as_postgrest(url, "authenticated", MUSICIAN) as conn:  # the owner reads their own history
        old = conn.execute(
            "select created_at from token_transactions where description = %s",
            ('Designer (3s, low): "door creak"',),
        ).fetchone()
    assert old is not None
    copied = {"prompt": "door creak", "duration": 3, "quality": "low"}  # its wording, as the charge says
    decoy = insert_as_user(
        gateway,
        MUSICIAN,
        **copied,
        created_at=old["created_at"].isoformat(),
        run_after="2099-01-01T00:00:00Z",
    )
    assert refusal(decoy) == (403, "42501", "sona_schedule_protected")  # and SQ004 without those columns
    assert balance(url, MUSICIAN) == START_BALANCE[MUSICIAN]
    assert [t for t in transactions(url, MUSICIAN) if t["type"] == "refund"] == []


def test_attack_3_a_charge_older_than_its_window_is_never_linked(plugin_refunds_db_url: str) -> None:
    """Even on the trusted path: a charge made before the window (here an hour before) is not the
    charge of a job inserted now, whatever the row's created_at says."""
    url = plugin_refunds_db_url
    user = new_user(url)
    sql(url, "select public.use_tokens(%s, %s, %s)", user, CHEAP.cost(), CHEAP.description())
    sql(
        url,
        "update token_transactions set created_at = now() - interval '1 hour' where type = 'usage'",
        role=None,
    )
    row = CHEAP.job_record(user)
    sql(url, "insert into jobs (user_id, prompt, duration, quality, mode, status, created_at)"
             " values (%s, %s, %s, %s, %s, %s, now() - interval '1 hour')",
        user, row["prompt"], row["duration"], row["quality"], row["mode"], row["status"])  # fmt: skip
    links = sql(url, "select transaction_id from sona_job_charges where user_id = %s", user)
    assert links == [{"transaction_id": None}]


def test_attack_4_rewinding_the_stage_after_the_paid_call_refunds_nothing(
    plugin_gateway_db: tuple[Gateway, str],
) -> None:
    gateway, url = plugin_gateway_db
    user = new_user(url)
    answer = generate_over_sql(url, user, CHEAP)
    assert answer.job is not None
    job = answer.job["id"]
    lease = sql(url, "select lease_token from claim_job(%s, gen_random_uuid(), 300, 3)", job)[0][
        "lease_token"
    ]
    assert sql(url, "select stage from advance_stage(%s, %s, 'generating')", job, lease) == [
        {"stage": "generating"}
    ]
    rewind = patch_as_user(gateway, user, job, stage="claimed")
    assert refusal(rewind) == (403, "42501", "sona_request_frozen")
    assert cancel_as_user(gateway, user, job).json()[0]["status"] == "cancelled"
    assert balance(url, user) == BONUS - CHEAP.cost()
    settled = sql(url, "select settlement, note from sona_job_charges where job_id = %s", job)
    assert settled == [{"settlement": "kept", "note": "cancelled after generation began"}]


FROZEN: list[tuple[str, dict[str, Any], str]] = [
    ("pay the cheapest, get the dearest", {"mode": "creator", "duration": 180, "quality": "high"},
     "sona_request_frozen"),
    ("rewrite the prompt", {"prompt": "something else entirely"}, "sona_request_frozen"),
    ("another naming convention", {"naming_convention": "x"}, "sona_request_frozen"),
    ("run it later", {"run_after": "2099-01-01T00:00:00Z"}, "sona_results_protected"),  # jobs_guard's already
    ("backdate it", {"created_at": "2020-01-01T00:00:00Z"}, "sona_request_frozen"),
    ("another key", {"musical_key": '{"key":"C","scale":"minor"}'}, "sona_request_frozen"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "change", "hint"), FROZEN, ids=[f[0] for f in FROZEN])
def test_attack_5_the_request_is_frozen_once_generate_charged_for_it(
    refunds_gateway_db: tuple[Gateway, str], name: str, change: dict[str, Any], hint: str
) -> None:
    gateway, url = refunds_gateway_db
    user = new_user(url)
    answer = generate_over_sql(url, user, CHEAP)
    assert answer.job is not None
    job = answer.job["id"]
    assert refusal(patch_as_user(gateway, user, job, **change)) == (403, "42501", hint)
    row = sql(url, "select mode, duration, quality, prompt, run_after from jobs where id = %s", job)[0]
    asked = {"mode": "designer", "duration": 1, "quality": "low", "prompt": CHEAP.prompt, "run_after": None}
    assert row == asked
    assert balance(url, user) == BONUS - CHEAP.cost()


def test_the_owner_still_shares_their_job(refunds_gateway_db: tuple[Gateway, str]) -> None:
    """What the owner keeps: `public` (the plug-in's share switch)."""
    gateway, url = refunds_gateway_db
    user = new_user(url)
    job = generate_over_sql(url, user, CHEAP).job
    assert job is not None
    assert patch_as_user(gateway, user, job["id"], public=True).status_code in (200, 204)
    assert sql(url, "select public from jobs where id = %s", job["id"]) == [{"public": True}]


def test_attack_6_a_direct_insert_cannot_take_generates_charge(
    plugin_refunds_db_url: str, tmp_path: Path
) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    gateway = gateway_over(url, tmp_path / "storage")
    gateway.start()
    try:
        # generate has charged; before its insert lands, the user's own insert of the same request
        charged = "select public.use_tokens(%s, %s, %s) as ok"
        assert sql(url, charged, user, CHEAP.cost(), CHEAP.description()) == [{"ok": True}]
        decoy = insert_as_user(gateway, user, prompt=CHEAP.prompt)
        inserted = requests.post(
            f"{gateway.url}/rest/v1/jobs",
            json=[CHEAP.job_record(user)],
            headers={**service_headers(gateway), "Prefer": "return=representation"},
            timeout=30,
        )  # fmt: skip
    finally:
        gateway.stop()
    assert refusal(decoy) == (400, "SQ004", "sona_unpaid_insert")
    assert inserted.status_code == 201
    job = inserted.json()[0]["id"]
    link = sql(url, "select tokens from sona_job_charges where job_id = %s", job)
    assert link == [{"tokens": CHEAP.cost()}]  # generate's own job holds its charge


def test_attack_8_the_table_refuses_a_file_name_that_is_a_path(plugin_refunds_db_url: str) -> None:
    url = plugin_refunds_db_url
    user = new_user(url)
    job = generate_over_sql(url, user, CHEAP).job
    assert job is not None
    lease = sql(url, "select lease_token from claim_job(%s, gen_random_uuid(), 300, 3)", job["id"])[0][
        "lease_token"
    ]
    done = "select id from complete_job(%s, %s, 'w', 'm', '{}'::jsonb, null, 'a.wav', 'a.mp3', %s)"
    for bad in ("Evil/../../../../tmp/Name", "Line\nBreak", "x" * 201, ".hidden"):
        with pytest.raises(psycopg.errors.CheckViolation, match="jobs_filename_safe"):
            sql(url, done, job["id"], lease, bad)
    assert sql(url, done, job["id"], lease, "Door_Slam_Sona") == [{"id": job["id"]}]


@pytest.mark.parametrize("prompt", ["drum", "x" * 801], ids=["4 characters", "801 characters"])
def test_attack_9_a_prompt_generate_would_refuse_is_refused_at_insert(
    plugin_gateway_db: tuple[Gateway, str], prompt: str
) -> None:
    gateway, url = plugin_gateway_db
    user = new_user(url)
    answer = insert_as_user(gateway, user, prompt=prompt)
    assert refusal(answer) == (400, "23514", "sona_prompt_length")
    assert answer.json()["message"].startswith("A prompt is 5 to 800 characters long")


SCHEDULING = [
    ("run_after", "2099-01-01T00:00:00Z"),
    ("dispatched_at", "2099-01-01T00:00:00Z"),
    ("dispatches", 7),
    ("created_at", "2020-01-01T00:00:00Z"),
]


@pytest.mark.parametrize(("column", "value"), SCHEDULING, ids=[s[0] for s in SCHEDULING])
def test_attack_9_an_insert_cannot_set_scheduling_or_bookkeeping_columns(
    plugin_gateway_db: tuple[Gateway, str], column: str, value: Any
) -> None:
    gateway, url = plugin_gateway_db
    user = new_user(url)
    assert refusal(insert_as_user(gateway, user, **{column: value})) == (
        403,
        "42501",
        "sona_schedule_protected",
    )


def test_attack_9_anon_reads_no_url_into_the_private_bucket(
    plugin_migrated_db_url: str, tmp_path: Path
) -> None:
    url = plugin_migrated_db_url
    signed = f"http://127.0.0.1:54321/storage/v1/object/sign/{AUDIO_BUCKET}/generated/master.wav?token=t"
    sql(url, "update jobs set wav_url = %s, mp3_url = %s, result_url = %s where id = %s",
        signed, signed, signed, COMPLETED_CREATOR, role=None)  # fmt: skip
    gateway = gateway_over(url, tmp_path / "storage")
    gateway.start()
    try:
        private = ("wav_url", "mp3_url", "result_url", "master_path", "preview_path", "audio", "user_email")
        reads = {
            column: requests.get(
                f"{gateway.url}/rest/v1/jobs", params={"select": column, "public": "eq.true"},
                headers=anon_headers(gateway), timeout=30,
            )
            for column in private
        }  # fmt: skip
    finally:
        gateway.stop()
    answers = {c: (a.status_code, a.json()["code"]) for c, a in reads.items()}
    assert answers == dict.fromkeys(reads, (401, "42501"))
    assert [r["id"] for r in showcase(url)] == [COMPLETED_CREATOR]  # the landing page still reads


# ---------------------------------------------------------------------------- deletion
def _completed(url: str, user: uuid.UUID, stem: str) -> str:
    job = generate_over_sql(url, user, CHEAP).job
    assert job is not None
    lease = sql(url, "select lease_token from claim_job(%s, gen_random_uuid(), 300, 3)", job["id"])[0][
        "lease_token"
    ]
    done = "select id from complete_job(%s, %s, 'w', 'm', '{}'::jsonb, null, %s, %s)"
    sql(url, done, job["id"], lease, f"generated/{stem}.wav", f"generated/{stem}.mp3")
    return str(job["id"])


def _due(url: str) -> list[str]:
    return sorted(r["name"] for r in sql(url, "select name from sona_storage_garbage_due(100)"))


def test_a_cleared_path_waits_a_day_and_restoring_it_keeps_the_files(plugin_refunds_db_url: str) -> None:
    url = plugin_refunds_db_url
    job = _completed(url, new_user(url), "kept")
    clear = "update jobs set master_path = null, preview_path = null where id = %s"
    sql(url, clear, job)  # a trusted hand, by mistake
    queued = sql(url, "select name, due_at - queued_at as wait from sona_storage_garbage order by name")
    assert [(r["name"], r["wait"].total_seconds()) for r in queued] == [
        (f"generated/kept.{ext}", 86400) for ext in ("json", "mp3", "wav")
    ]
    assert _due(url) == []
    restore = "update jobs set master_path = %s, preview_path = %s where id = %s"
    sql(url, restore, "generated/kept.wav", "generated/kept.mp3", job)
    assert sql(url, "select name from sona_storage_garbage") == []


def test_a_path_cleared_through_a_definer_function_by_a_user_queues_nothing(
    plugin_refunds_db_url: str,
) -> None:
    """Whatever definer function a user reaches (the plug-in may add more), their clearing deletes
    no file: the request's role, not the function's owner, decides."""
    url = plugin_refunds_db_url
    job = _completed(url, new_user(url), "mine")
    definer = (
        "create function public.forget_paths(p uuid) returns void language sql security definer as"
        " $$ update public.jobs set master_path = null, preview_path = null where id = p $$"
    )
    sql(url, definer, role=None)
    with as_postgrest(url, "anon") as conn:
        conn.execute("select public.forget_paths(%s)", (job,))
    assert sql(url, "select master_path from jobs where id = %s", job) == [{"master_path": None}]
    assert sql(url, "select name from sona_storage_garbage") == []


def test_the_plugins_cleanup_still_works_for_the_service_role(plugin_gateway_db: tuple[Gateway, str]) -> None:
    """Its cron calls the cleanup-expired-audio Edge Function, which runs with the service role."""
    gateway, url = plugin_gateway_db
    answer = requests.post(
        f"{gateway.url}/rest/v1/rpc/cleanup_expired_audio_paths",
        json={"expiration_hours": 24, "batch_limit": 50},
        headers=service_headers(gateway),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()) == 1  # the designer job completed two days ago
    assert _due(url) == []  # its files wait out the delay
