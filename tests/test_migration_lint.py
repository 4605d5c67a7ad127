"""The migrations pass Squawk, the PostgreSQL migration linter (squawk-cli from PyPI), with the
repository's .squawk.toml (issue 30): `python3 scripts/run.py test` runs it before the tests, and a
finding fails them. The rules it keeps on catch what would stall the plug-in's inserts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devstack.database import REPO_ROOT, migration_files

SQUAWK = Path(sys.executable).parent / "squawk"


def squawk(*paths: Path) -> subprocess.CompletedProcess[str]:
    config = REPO_ROOT / ".squawk.toml"
    command = [str(SQUAWK), "--config", str(config), "--reporter", "gcc", *map(str, paths)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)


def test_the_migrations_pass_the_linter() -> None:
    linted = squawk(*migration_files())
    assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.mark.parametrize(
    ("statement", "rule"),
    [
        ("alter table public.jobs add column owner_note text not null;", "adding-required-field"),
        (
            "alter table public.jobs add constraint jobs_short check (duration < 100);",
            "constraint-missing-not-valid",
        ),
        ("alter table public.jobs alter column prompt type varchar(800);", "changing-column-type"),
        ("alter table public.jobs drop column user_email;", "ban-drop-column"),
    ],
)
def test_a_migration_that_would_lock_or_break_the_jobs_table_fails_the_lint(
    tmp_path: Path, statement: str, rule: str
) -> None:
    migration = tmp_path / "20990101000000_bad.sql"
    migration.write_text(f"set lock_timeout = '10s';\nset statement_timeout = '5min';\n{statement}\n")
    linted = squawk(migration)
    assert linted.returncode != 0
    assert rule in linted.stdout


def test_every_migration_has_a_version_of_its_own() -> None:
    # `supabase db push` records each file by the digits before its first underscore and refuses two
    # files with one version (two issues once both took 20261207000100).
    versions = [path.name.split("_", 1)[0] for path in migration_files()]
    assert all(v.isdigit() and len(v) == 14 for v in versions), versions
    assert len(set(versions)) == len(versions), versions
