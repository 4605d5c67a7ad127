"""The migration: upgrades the earlier table in place, works on a fresh database, is idempotent,
and locks the worker's columns away from users (row level security and column privileges)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from devstack.database import apply_sql, migration_files, stand_ins_sql
from tests.support import connect, dispatched, insert_job, job_row, new_user, reclaimed, sql

# The table and policies as the earlier worker's SQL created them.
OLD_SCHEMA = """
create table public.jobs (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users(id),
  prompt text not null,
  duration integer not null default 10 check (duration >= 1 and duration <= 60),
  quality text not null default 'medium' check (quality in ('low','medium','high')),
  mode text not null default 'default',
  status text not null default 'pending'
    check (status in ('pending','queued','processing','completed','failed')),
  created_at timestamptz default now(), updated_at timestamptz default now(),
  completed_at timestamptz, error_message text, result_url text, wav_url text, mp3_url text);
create function public.update_updated_at_column() returns trigger language plpgsql as
  $$ begin new.updated_at = now(); return new; end $$;
create trigger update_jobs_updated_at before update on public.jobs
  for each row execute function public.update_updated_at_column();
alter table public.jobs enable row level security;
create policy "Users can view own jobs" on public.jobs for select using (auth.uid() = user_id);
create policy "Users can insert own jobs" on public.jobs for insert with check (auth.uid() = user_id);
create policy "Users can update own jobs" on public.jobs for update using (auth.uid() = user_id);
"""

# What "the schema" is, for comparing before and after a second apply.
CATALOG = """
select 'column' as kind, table_name || '.' || column_name || ' ' || data_type || ' ' ||
       coalesce(column_default, '') as item
  from information_schema.columns where table_schema = 'public'
union all select 'constraint', conrelid::regclass || ' ' || pg_get_constraintdef(oid)
  from pg_constraint where connamespace = 'public'::regnamespace
union all select 'index', indexdef from pg_indexes where schemaname = 'public'
union all select 'policy', policyname || ' ' || cmd || ' ' || coalesce(qual, '') || coalesce(with_check, '')
  from pg_policies where schemaname = 'public'
union all select 'function', p.oid::regprocedure || ' ' || md5(pg_get_functiondef(p.oid)) || ' ' ||
       coalesce(array_to_string(p.proacl, ','), '')
  from pg_proc p where pronamespace = 'public'::regnamespace and prokind = 'f'
union all select 'trigger', tgname || ' ' || pg_get_triggerdef(oid)
  from pg_trigger where not tgisinternal
union all select 'grant', grantee || ' ' || privilege_type || ' ' || table_name || '.' || column_name
  from information_schema.column_privileges where table_schema = 'public'
order by 1, 2
"""


def migrate_sql() -> list[str]:
    return [p.read_text() for p in migration_files()]


def test_upgrade_keeps_every_old_row_and_pending_ones_become_claimable(empty_db_url: str) -> None:
    apply_sql(empty_db_url, stand_ins_sql(), OLD_SCHEMA)
    user = new_user(empty_db_url)
    old = {
        status: insert_job(empty_db_url, user_id=user, status=status, prompt=f"old {status}")
        for status in ("pending", "queued", "processing", "completed", "failed")
    }

    apply_sql(empty_db_url, *migrate_sql())

    for status, job_id in old.items():
        row = job_row(empty_db_url, job_id)
        assert (row["status"], row["prompt"], row["attempts"]) == (status, f"old {status}", 0)
    for status in ("pending", "queued"):
        claimed = sql(empty_db_url, "select * from claim_job(%s, gen_random_uuid(), 60, 3)", old[status])
        assert [r["id"] for r in claimed] == [old[status]]
    assert sql(empty_db_url, "select * from claim_job(%s, gen_random_uuid(), 60, 3)", old["completed"]) == []


def seed_era_rows_without_created_at(url: str) -> dict[str, uuid.UUID]:
    """Rows the earlier worker left with created_at null, one with an updated_at and one without."""
    apply_sql(url, stand_ins_sql(), OLD_SCHEMA)
    two_minutes_ago = datetime.now(UTC) - timedelta(minutes=2)
    return {
        "updated": insert_job(url, created_at=None, updated_at=two_minutes_ago),
        "no timestamps": insert_job(url, created_at=None, updated_at=None),
    }


def test_upgrade_backfills_created_at_from_updated_at_else_now(empty_db_url: str) -> None:
    rows = seed_era_rows_without_created_at(empty_db_url)
    before = job_row(empty_db_url, rows["updated"])["updated_at"]
    apply_sql(empty_db_url, *migrate_sql())
    updated = job_row(empty_db_url, rows["updated"])
    assert updated["created_at"] == updated["updated_at"] == before
    assert job_row(empty_db_url, rows["no timestamps"])["created_at"] is not None


def test_seed_era_pending_rows_without_created_at_are_dispatched_and_counted(empty_db_url: str) -> None:
    rows = seed_era_rows_without_created_at(empty_db_url)
    apply_sql(empty_db_url, *migrate_sql())
    # The row updated two minutes ago is past the 60 s grace; the other was just backfilled to now.
    assert dispatched(reclaimed(empty_db_url, 3, 60, 10, 1000, 1000)) == [rows["updated"]]
    stats = sql(empty_db_url, "select job_stats(1) as s")[0]["s"]
    assert (stats["total"], stats["by_status"]) == (2, {"pending": 2})


def test_created_at_is_required_and_defaults_to_now_after_the_upgrade(empty_db_url: str) -> None:
    apply_sql(empty_db_url, stand_ins_sql(), OLD_SCHEMA, *migrate_sql())
    assert job_row(empty_db_url, insert_job(empty_db_url))["created_at"] is not None
    with pytest.raises(psycopg.Error) as caught:
        insert_job(empty_db_url, created_at=None)
    assert caught.value.sqlstate == "23502"  # not_null_violation


def test_upgrade_keeps_the_tables_own_updated_at_trigger_and_adds_none(empty_db_url: str) -> None:
    apply_sql(empty_db_url, stand_ins_sql(), OLD_SCHEMA, *migrate_sql())
    triggers = sql(
        empty_db_url,
        "select tgname from pg_trigger where tgrelid = 'public.jobs'::regclass and not tgisinternal"
        " and tgfoid::regproc::text like '%updated_at%'",
        role=None,
    )
    # Another owner's trigger is never dropped (docs/plugin-client.md); one is enough, so ours is not added.
    assert triggers == [{"tgname": "update_jobs_updated_at"}]
    # The earlier function stays: other tables may use it.
    assert sql(empty_db_url, "select to_regproc('public.update_updated_at_column') is not null as kept")[0][
        "kept"
    ]


def test_fresh_database_gets_the_whole_schema(empty_db_url: str) -> None:
    apply_sql(empty_db_url, stand_ins_sql(), *migrate_sql())
    job_id = insert_job(empty_db_url)
    assert job_row(empty_db_url, job_id)["status"] == "pending"


def test_applying_the_migration_twice_changes_nothing(empty_db_url: str) -> None:
    apply_sql(empty_db_url, stand_ins_sql(), OLD_SCHEMA, *migrate_sql())
    job_id = insert_job(empty_db_url)
    before = sql(empty_db_url, CATALOG, role=None)
    row_before = job_row(empty_db_url, job_id)

    apply_sql(empty_db_url, *migrate_sql())

    assert sql(empty_db_url, CATALOG, role=None) == before
    assert job_row(empty_db_url, job_id) == row_before


def test_updated_at_is_kept_by_the_database(db_url: str) -> None:
    job_id = insert_job(db_url)
    before = job_row(db_url, job_id)["updated_at"]
    sql(db_url, "update jobs set prompt = 'changed' where id = %s", job_id)
    assert job_row(db_url, job_id)["updated_at"] > before


# -- row level security, as the plug-in's user --------------------------------------------------


def as_user(url: str, user: uuid.UUID, query: str, params: object = None) -> list[dict[str, object]]:
    with connect(url, "authenticated", user) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return list(cur.fetchall()) if cur.description else []


def test_a_user_reads_and_creates_their_own_jobs(db_url: str) -> None:
    me = new_user(db_url)
    mine = as_user(
        db_url,
        me,
        "insert into jobs (user_id, prompt, duration) values (%s, 'rain', 5) returning id, status",
        (me,),
    )
    assert mine[0]["status"] == "pending"
    assert [r["id"] for r in as_user(db_url, me, "select id from jobs")] == [mine[0]["id"]]


def test_a_user_cannot_read_another_users_job(db_url: str) -> None:
    me, other = new_user(db_url), new_user(db_url)
    insert_job(db_url, user_id=other)
    assert as_user(db_url, me, "select id from jobs") == []


@pytest.mark.parametrize(
    ("query", "sqlstate"),
    [
        pytest.param(
            "insert into jobs (user_id, prompt, status) values (%(me)s, 'x', 'completed')",
            "42501",
            id="insert-a-completed-job",
        ),
        pytest.param(
            "insert into jobs (user_id, prompt, wav_url) values (%(me)s, 'x', 'http://evil')",
            "42501",
            id="insert-with-a-url",
        ),
        pytest.param(
            "insert into jobs (user_id, prompt) values (%(other)s, 'x')",
            "42501",
            id="insert-for-another-user",
        ),
        pytest.param("update jobs set status = 'completed' where id = %(job)s", "42501", id="set-own-status"),
        pytest.param(
            "update jobs set wav_url = 'http://evil' where id = %(job)s", "42501", id="point-wav-url-anywhere"
        ),
        pytest.param("delete from jobs where id = %(job)s", "42501", id="delete-own-job"),
        pytest.param("select * from claim_job(%(job)s, gen_random_uuid(), 60, 3)", "42501", id="call-claim"),
        pytest.param("select reclaim_and_dispatch(3, 0, 10, 1000, 1000)", "42501", id="call-reclaim"),
        pytest.param("select * from job_attempts", "42501", id="read-attempt-history"),
    ],
)
def test_a_user_cannot_touch_what_the_worker_owns(db_url: str, query: str, sqlstate: str) -> None:
    me, other = new_user(db_url), new_user(db_url)
    job = insert_job(db_url, user_id=me)
    before = job_row(db_url, job)
    with pytest.raises(psycopg.Error) as caught:
        as_user(db_url, me, query, {"me": me, "other": other, "job": job})
    assert caught.value.sqlstate == sqlstate
    assert job_row(db_url, job) == before


def test_anon_cannot_see_jobs(db_url: str) -> None:
    insert_job(db_url)
    with pytest.raises(psycopg.Error) as caught, connect(db_url, "anon") as conn:
        conn.execute("select * from jobs")
    assert caught.value.sqlstate == "42501"
