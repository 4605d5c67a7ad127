"""The reused connections of the local stack's and the tests' helpers (devstack/connections.py):
reset as a new session when lent, and bounded, so a test worker going through hundreds of
databases never holds idle connections to all of them."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

from devstack.connections import MAX_DATABASES, shared
from tests.conftest import fresh_database


def _idle_backends(pg_server: str, names: list[str]) -> dict[str, int]:
    with psycopg.connect(pg_server, autocommit=True) as conn:
        rows = conn.execute(
            "select datname, count(*) from pg_stat_activity where datname = any(%s) group by datname",
            (names,),
        ).fetchall()
    return {name: count for name, count in rows}


def test_idle_connections_are_kept_only_for_the_most_recently_used_databases(pg_server: str) -> None:
    urls = [fresh_database(pg_server, template="template0") for _ in range(MAX_DATABASES + 2)]
    names = [str(conninfo_to_dict(url)["dbname"]) for url in urls]
    for url in urls:
        with shared(url).borrow() as conn:
            conn.execute("select 1")
    held = _idle_backends(pg_server, names)
    assert held == {name: 1 for name in names[-MAX_DATABASES:]}


def test_a_lent_connection_starts_as_a_new_session(pg_server: str) -> None:
    url = fresh_database(pg_server, template="template0")
    with shared(url).borrow(autocommit=True) as conn:
        conn.execute("set role pg_monitor")
        conn.execute("select set_config('request.jwt.claims', '{\"sub\": \"x\"}', false)")
    with shared(url).borrow() as conn:
        row = conn.execute(
            "select current_user = session_user as own_role,"
            " coalesce(current_setting('request.jwt.claims', true), '') as claims"
        ).fetchone()
    assert row == {"own_role": True, "claims": ""}
