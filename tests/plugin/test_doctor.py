"""Issue 29, item 6: `python -m sona doctor` on the plug-in's database lists the grants that let anon
or a signed-in user mint or spend tokens, change configuration or clear audio paths, each with SQL
that closes it; applied, that SQL leaves nothing to list and the holes are shut."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from sona.ops.doctor import find_holes
from tests.plugin.plugin_db import OTHER_MUSICIAN, balance
from tests.support import connect, sql

# What the plug-in's own schema leaves open (plugin_schema.sql, from its migrations).
OPEN_ON_THE_PLUGIN = {
    ("function", "public.add_user_tokens(uuid, integer, text, text, text)", "anon, authenticated"),
    ("function", "public.use_tokens(uuid, integer, text)", "anon, authenticated"),
    ("function", "public.cleanup_expired_audio_paths(integer, integer)", "anon, authenticated"),
    ("table", "public.app_config", "anon, authenticated"),
}


def holes(url: str) -> set[tuple[str, str, str]]:
    return {(f.kind, f.object, f.roles) for f in find_holes(url)}


def test_the_doctor_lists_the_plugins_own_holes(plugin_db_url: str) -> None:
    assert holes(plugin_db_url) == OPEN_ON_THE_PLUGIN


def test_the_migrations_close_the_cleanup_and_leave_the_plugins_token_functions_to_its_owner(
    plugin_migrated_db_url: str,
) -> None:
    assert holes(plugin_migrated_db_url) == {
        h for h in OPEN_ON_THE_PLUGIN if not h[1].startswith("public.cleanup_expired_audio_paths")
    }


def test_the_printed_fixes_close_every_hole_and_the_service_role_keeps_its_calls(plugin_db_url: str) -> None:
    url = plugin_db_url
    for finding in find_holes(url):
        sql(url, finding.fix, role=None)
    assert find_holes(url) == []
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege),
        connect(url, "anon") as conn,
    ):  # anon mints no more
        conn.execute("select add_user_tokens(%s, 1000000, 'bonus', 'free money')", (OTHER_MUSICIAN,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege), connect(url, "anon") as conn:
        conn.execute("update app_config set value = '1000000' where key = 'beta_bonus_amount'")
    before = balance(url, OTHER_MUSICIAN)
    sql(
        url, "select use_tokens(%s, 6, 'Designer (1s, low): \"door slam\"')", OTHER_MUSICIAN
    )  # generate's call
    assert balance(url, OTHER_MUSICIAN) == before - 6


def test_the_command_prints_each_fix_and_fails_while_a_hole_is_open(plugin_db_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sona", "doctor", "--database-url", plugin_db_url],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "4 grant(s) to close before deploying" in done.stdout
    assert "revoke execute on function public.add_user_tokens(uuid, integer, text, text, text)" in done.stdout
    assert "alter table public.app_config enable row level security;" in done.stdout


def test_a_clean_database_passes(db_url: str) -> None:
    assert find_holes(db_url) == []
