"""This project's migrations on the plug-in's own database (issue: serve the real plug-in, item 1):
they apply on its rows in every state and mode, twice, in one go or not at all, change no row's
status, mode or results, and drop none of its policies, grants or triggers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack.database import apply_sql, migrate
from tests.plugin.generate import GenerateRequest, generate_over_sql
from tests.plugin.plugin_db import MUSICIAN, build_plugin_database, my_sounds, showcase
from tests.support import sql

# What a row is, for the plug-in: what it asked for and what it got.
ROWS = """select id, status, mode, quality, duration, prompt, error_message, result_url, master_path,
  preview_path, filename, enhanced_prompt, public, public_path, completed_at,
  musical_key, producer_config, naming_convention from public.jobs order by id"""
# What the plug-in owns on the table: its policies, triggers and grants.
POLICIES = """select policyname, cmd, roles::text, qual, with_check from pg_policies where tablename = 'jobs'
  order by 1"""
TRIGGERS = """select tgname, tgenabled from pg_trigger where tgrelid = 'public.jobs'::regclass
  and not tgisinternal order by 1"""
GRANTS = """select grantee, privilege_type from information_schema.role_table_grants
  where table_schema = 'public' and table_name = 'jobs' order by 1, 2"""
STORAGE_POLICIES = "select policyname from pg_policies where schemaname = 'storage'"


def snapshot(url: str, query: str) -> list[dict[str, Any]]:
    return sql(url, query, role=None)


@pytest.fixture
def plugin_url(empty_db_url: str) -> str:
    build_plugin_database(empty_db_url)
    return empty_db_url


def test_applied_twice_no_row_changes_and_nothing_of_the_plugins_goes(plugin_url: str) -> None:
    before = {q: snapshot(plugin_url, q) for q in (ROWS, POLICIES, TRIGGERS, GRANTS, STORAGE_POLICIES)}
    migrate(plugin_url)
    migrate(plugin_url)
    assert snapshot(plugin_url, ROWS) == before[ROWS]
    assert {tuple(r.values()) for r in before[POLICIES]} <= {
        tuple(r.values()) for r in snapshot(plugin_url, POLICIES)
    }
    assert {tuple(r.values()) for r in before[TRIGGERS]} <= {
        tuple(r.values()) for r in snapshot(plugin_url, TRIGGERS)
    }
    # One narrowing, on purpose (issue 29): anon's SELECT on the whole table becomes SELECT on the
    # showcase's columns, so no URL into the private bucket is readable without signing in.
    showcase_read = ("anon", "SELECT")
    assert showcase_read in {tuple(r.values()) for r in before[GRANTS]}
    assert {tuple(r.values()) for r in before[GRANTS]} - {showcase_read} <= {
        tuple(r.values()) for r in snapshot(plugin_url, GRANTS)
    }
    reads = "select has_column_privilege('anon', 'public.jobs', 'public_path', 'select') as ok"
    assert sql(plugin_url, reads, role=None) == [{"ok": True}]
    assert {r["policyname"] for r in before[STORAGE_POLICIES]} <= {
        r["policyname"] for r in snapshot(plugin_url, STORAGE_POLICIES)
    }


def test_a_second_application_changes_no_object(plugin_url: str) -> None:
    migrate(plugin_url)
    catalog = """select p.proname, md5(pg_get_functiondef(p.oid)) as body from pg_proc p
      join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'public' order by 1, 2"""
    first = (snapshot(plugin_url, catalog), snapshot(plugin_url, POLICIES), snapshot(plugin_url, TRIGGERS))
    migrate(plugin_url)
    assert (
        snapshot(plugin_url, catalog),
        snapshot(plugin_url, POLICIES),
        snapshot(plugin_url, TRIGGERS),
    ) == first


def test_a_failing_migration_leaves_nothing_of_any_applied(
    plugin_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from devstack import database

    broken = tmp_path / "99999999999999_broken.sql"
    broken.write_text("select 1/0;")
    files = [*database.migration_files(), broken]
    monkeypatch.setattr(database, "migration_files", lambda: files)
    with pytest.raises(psycopg.errors.DivisionByZero):
        migrate(plugin_url)
    assert sql(
        plugin_url, "select to_regprocedure('public.claim_job(uuid, uuid, integer, integer)') as f"
    ) == [{"f": None}]
    assert sql(
        plugin_url,
        "select count(*) as n from information_schema.columns"
        " where table_name = 'jobs' and column_name = 'lease_token'",
    ) == [{"n": 0}]


def test_after_migrating_the_plugin_still_reads_as_before(plugin_url: str) -> None:
    showcase_before, sounds_before = showcase(plugin_url), my_sounds(plugin_url, MUSICIAN)
    migrate(plugin_url)
    assert [r["id"] for r in showcase(plugin_url)] == [r["id"] for r in showcase_before]
    assert [r["id"] for r in my_sounds(plugin_url, MUSICIAN)] == [r["id"] for r in sounds_before]


def test_generate_without_a_quality_is_no_longer_refused_after_the_tokens_are_charged(
    plugin_url: str,
) -> None:
    """generate's default quality 'standard' is the table's 'medium' once migrated (before, the insert
    failed after the charge: tests/plugin/test_plugin_fixture.py)."""
    migrate(plugin_url)
    apply_sql(plugin_url, "insert into sona_settings values ('max_active_jobs', 10)")
    answer = generate_over_sql(plugin_url, MUSICIAN, GenerateRequest("soft wind chimes"))
    assert answer.status == 201, answer.error
    assert answer.job is not None
    assert (answer.job["status"], answer.job["quality"], answer.job["mode"]) == (
        "queued",
        "medium",
        "designer",
    )
