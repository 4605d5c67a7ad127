"""Realtime (issue 30): the migrations put public.jobs in Supabase's supabase_realtime publication
where it exists, once, and touch no publication anywhere else. The publication is made here as a
Supabase project has it: owned by postgres, no tables, publishing inserts, updates, deletes and
truncates (Supabase's own image test of its realtime publication checks exactly that shape)."""

from __future__ import annotations

import pytest

from devstack.database import apply_sql, migrate, stand_ins_sql
from tests.plugin.plugin_db import build_plugin_database
from tests.support import sql

AS_SUPABASE_HAS_IT = "create publication supabase_realtime"
PUBLISHED = """select pubname, schemaname || '.' || tablename as "table" from pg_publication_tables
  order by 1, 2"""


def published(url: str) -> list[tuple[str, str]]:
    return [(r["pubname"], r["table"]) for r in sql(url, PUBLISHED, role=None)]


@pytest.mark.parametrize(
    ("publication", "expected"),
    [
        pytest.param(None, [], id="plain-postgresql"),
        pytest.param(AS_SUPABASE_HAS_IT, [("supabase_realtime", "public.jobs")], id="supabase"),
        pytest.param(
            "create publication supabase_realtime for all tables",
            [("supabase_realtime", "public.job_attempts"), ("supabase_realtime", "public.jobs")],
            id="realtime-for-all-tables",
        ),
    ],
)
def test_jobs_is_published_to_realtime_where_the_publication_exists(
    empty_db_url: str, publication: str | None, expected: list[tuple[str, str]]
) -> None:
    apply_sql(empty_db_url, stand_ins_sql(), *([publication] if publication else []))
    migrate(empty_db_url)
    migrate(empty_db_url)  # a second application adds nothing and fails on nothing
    found = published(empty_db_url)
    assert [p for p in found if p[1] in {"public.jobs", "public.job_attempts"}] == expected
    assert len(found) == len(set(found))


def test_on_the_plugins_database_only_jobs_joins_the_publication(empty_db_url: str) -> None:
    build_plugin_database(empty_db_url)
    apply_sql(empty_db_url, AS_SUPABASE_HAS_IT)
    migrate(empty_db_url)
    assert published(empty_db_url) == [("supabase_realtime", "public.jobs")]


def test_a_job_published_to_realtime_still_updates_and_deletes(db_url: str) -> None:
    """A published table needs a replica identity for its updates and deletes: jobs' primary key."""
    apply_sql(db_url, AS_SUPABASE_HAS_IT, "alter publication supabase_realtime add table public.jobs")
    try:
        rows = sql(db_url, "select relreplident from pg_class where oid = 'public.jobs'::regclass", role=None)
        assert rows == [{"relreplident": "d"}]
        user = sql(db_url, "insert into auth.users (email) values ('r@example.com') returning id", role=None)
        job = sql(db_url, "insert into jobs (user_id, prompt) values (%s, 'rain') returning id",
                  user[0]["id"], role=None)[0]["id"]  # fmt: skip
        sql(db_url, "update jobs set prompt = 'snow' where id = %s", job, role=None)
        sql(db_url, "delete from jobs where id = %s", job, role=None)
    finally:
        apply_sql(db_url, "drop publication supabase_realtime")
