"""supabase/schemas/ and supabase/migrations/ give the same database (issue 30), the way Procrastinate
proves its schema.sql against its migrations: the migrations applied to an empty database and the
schema files loaded into another must have the same catalog (tests/schema_catalog.py: tables,
columns, constraints, indexes, functions with their bodies, triggers, policies, grants, comments,
publication members, buckets). On the plug-in's own database the migrations must add or change
exactly what the schema files declare, apart from the few things they leave to the plug-in on
purpose (listed below with why), so a migration that only works on an empty database is caught."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from devstack.database import REPO_ROOT, apply_sql, migrate, stand_ins_sql
from tests.conftest import fresh_database
from tests.plugin.plugin_db import build_plugin_database
from tests.schema_catalog import catalog, difference

SCHEMAS_DIR = REPO_ROOT / "supabase" / "schemas"
MIGRATIONS_DIR = REPO_ROOT / "supabase" / "migrations"

Catalog = dict[tuple[str, str], str]

# What the migrations leave as the plug-in made it, and why; anything else they do on its database
# must be what supabase/schemas/ says.
LEFT_TO_THE_PLUGIN: dict[tuple[str, str], str] = {
    ("constraint", "public.jobs.jobs_prompt_length"): "added NOT VALID: rows written before it stay",
    ("constraint", "public.jobs.jobs_duration_check"): "the plug-in's own valid_duration (1 to 180) stays",
    ("constraint", "public.jobs.jobs_quality_check"): "the plug-in's own valid_quality stays",
    ("constraint", "public.jobs.valid_status"): "replaced by jobs_status_check, which adds 'cancelled'",
    ("trigger", "jobs.jobs_set_updated_at"): "the plug-in's update_jobs_updated_at keeps updated_at",
    ("grant", "public.jobs"): "on a table with other owners' policies no grant is taken away",
}
# What the migrations change of the plug-in's own objects on purpose (issue 29), which no schema file
# can declare because the objects are the plug-in's.
SHOWCASE_COLUMNS = (
    *("id", "prompt", "enhanced_prompt", "filename", "mode", "duration", "quality", "status", "public"),
    *("public_path", "created_at", "completed_at", "musical_key", "producer_config"),
)
SHOWCASE_ONLY = "anon reads the showcase's columns only, no URL into the private bucket"
CLOSED_ON_THE_PLUGIN: dict[tuple[str, str], str] = {
    ("function grant", "cleanup_expired_audio_paths(integer,integer)"): (
        "EXECUTE closed to anon, authenticated and PUBLIC: anyone could clear every user's paths"
    ),
    **{("column grant", f"public.jobs.{c}"): SHOWCASE_ONLY for c in SHOWCASE_COLUMNS},
}


def schema_files() -> list[Path]:
    return sorted(SCHEMAS_DIR.glob("*.sql"))


def load_schema_files(url: str) -> None:
    """Supabase's stand-ins, then each schema file in file-name order, as `supabase db diff` does."""
    apply_sql(url, stand_ins_sql())
    with psycopg.connect(url, autocommit=True) as conn:
        for path in schema_files():
            conn.execute(path.read_text())  # type: ignore[arg-type]  # a whole file, no parameters


# Supabase's Realtime publication, as a project has it (tests/test_realtime_publication.py).
REALTIME = "create publication supabase_realtime"


def declared_on(pg_server: str, *before: str) -> Catalog:
    """The catalog of an empty database (with `before` applied) with supabase/schemas/ loaded."""
    url = fresh_database(pg_server, template="template0")
    apply_sql(url, *before)
    load_schema_files(url)
    return catalog(url)


@pytest.fixture
def declared(pg_server: str) -> Catalog:
    return declared_on(pg_server)


@pytest.mark.parametrize("before", [(), (REALTIME,)], ids=["plain-postgresql", "with-realtime"])
def test_the_migrations_on_an_empty_database_give_what_the_schema_files_declare(
    pg_server: str, empty_db_url: str, before: tuple[str, ...]
) -> None:
    apply_sql(empty_db_url, *before)
    migrate(empty_db_url)
    drift = difference(declared_on(pg_server, *before), catalog(empty_db_url), "supabase/schemas",
                       "supabase/migrations")  # fmt: skip
    assert not drift, f"the migrations and the schema files disagree:\n{drift}"


def test_on_the_plugins_database_the_migrations_add_and_change_what_the_schema_files_declare(
    empty_db_url: str, declared: Catalog
) -> None:
    build_plugin_database(empty_db_url)
    before = catalog(empty_db_url)
    migrate(empty_db_url)
    expected = {**before, **declared}  # the plug-in's database with every declared object as declared
    migrated = catalog(empty_db_url)
    left = {k for k in LEFT_TO_THE_PLUGIN if expected.get(k) != migrated.get(k)}
    assert left == set(LEFT_TO_THE_PLUGIN), "listed as left to the plug-in but not different: update the list"
    closed = {k for k in CLOSED_ON_THE_PLUGIN if expected.get(k) != migrated.get(k)}
    assert closed == set(CLOSED_ON_THE_PLUGIN), "listed as closed on the plug-in but unchanged: update it"
    left |= closed
    drift = difference(
        {k: v for k, v in expected.items() if k not in left},
        {k: v for k, v in migrated.items() if k not in left},
        "plug-in + supabase/schemas",
        "plug-in + supabase/migrations",
    )
    assert not drift, f"on the plug-in's database the migrations differ from the schema files:\n{drift}"


CREATE_FUNCTION = re.compile(r"^create (?:or replace )?function (public\.\w+)\(", re.I | re.M)


@pytest.mark.parametrize(
    "files",
    [
        pytest.param(schema_files(), id="schemas"),
        *(pytest.param([p], id=p.name) for p in sorted(MIGRATIONS_DIR.glob("*.sql"))),
    ],
)
def test_each_function_is_written_once(files: list[Path]) -> None:
    names = Counter(name for path in files for name in CREATE_FUNCTION.findall(path.read_text()))
    assert names, "no function found"
    assert {name: n for name, n in names.items() if n > 1} == {}
