"""How the test suite runs the local stack in parallel: a stack's database on a server it is given,
and the units pytest-xdist hands to one worker (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from devstack.database import database_url_on
from devstack.stack import LocalStack
from tests.conftest import group_of
from tests.support import sql


def databases(server_url: str) -> set[str]:
    with psycopg.connect(server_url, autocommit=True) as conn:
        return {row[0] for row in conn.execute("select datname from pg_database")}


def test_a_stack_given_a_server_has_a_migrated_database_there_until_it_stops(
    tmp_path: Path, pg_server: str
) -> None:
    stack = LocalStack(tmp_path, start_functions=False, with_relay=False, database_server=pg_server)
    with stack:
        name = stack.database_url.split("?", 1)[0].rsplit("/", 1)[1]
        assert stack.database_url == database_url_on(pg_server, name)
        assert name in databases(pg_server)
        assert sql(stack.database_url, "select count(*) as n from public.jobs", role=None) == [{"n": 0}]
        assert not (tmp_path / "pgdata").exists()  # no server of its own
    assert name not in databases(pg_server)


@pytest.mark.parametrize(
    ("nodeid", "group"),
    [
        ("tests/test_reclaim.py::test_x", "tests/test_reclaim.py"),
        ("tests/test_reclaim.py::test_x[a/b]", "tests/test_reclaim.py"),
        ("tests/hardening/test_bad_rows.py::test_y[1]", "tests/hardening"),
        ("tests/hardening/test_totals.py::test_z", "tests/hardening"),
        ("tests/hardening/deep/test_w.py::test_v", "tests/hardening"),
        ("tests/plugin/test_doctor.py::test_v", "tests/plugin/test_doctor.py"),  # shares no stack
    ],
)
def test_a_file_or_a_folder_suite_runs_whole_on_one_worker(nodeid: str, group: str) -> None:
    assert group_of(nodeid) == group


@pytest.mark.parametrize(
    ("server", "url"),
    [
        ("postgresql://postgres@/postgres?host=/tmp/x", "postgresql://postgres@/t_1?host=/tmp/x"),
        ("postgresql://u:p@127.0.0.1:5432/postgres", "postgresql://u:p@127.0.0.1:5432/t_1"),
    ],
)
def test_a_database_url_names_the_database_on_the_same_server(server: str, url: str) -> None:
    assert database_url_on(server, "t_1") == url
