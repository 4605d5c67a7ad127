"""The trigger benchmark (`python -m devstack bench --only triggers`, issue 30): every shape it
measures leaves the schema as it found it, and each operation it times really inserts or claims."""

from __future__ import annotations

from devstack.bench import bench_triggers
from devstack.database import apply_sql
from tests.schema_catalog import catalog
from tests.support import sql


def test_every_shape_is_undone(private_db_url: str) -> None:
    before = catalog(private_db_url)
    for setup, undo in bench_triggers._shapes(private_db_url).values():
        apply_sql(private_db_url, setup)
        apply_sql(private_db_url, undo)
    assert catalog(private_db_url) == before


def test_a_round_charges_inserts_and_claims_every_job(private_db_url: str) -> None:
    apply_sql(private_db_url, bench_triggers.PLUGIN_CREDIT_TABLES)
    figures = bench_triggers._round(private_db_url, 4)
    assert len(figures) == len(bench_triggers.OPERATIONS)
    assert all(f > 0 for f in figures)
    rows = sql(private_db_url, "select status, count(*) as n from jobs group by 1 order by 1", role=None)
    assert rows == [{"status": "pending", "n": 4}, {"status": "processing", "n": 4}]
    linked = sql(private_db_url, "select count(transaction_id) as n from sona_job_charges", role=None)
    assert linked == [{"n": 4}]


def test_the_table_shows_what_each_trigger_adds() -> None:
    report = {
        "operations": ["insert", "claim"],
        "per_op_us": {
            "after (issue 30: one guard)": [30.0, 50.0],
            "without triggers": [10.0, 20.0],
            "without jobs.jobs_guard": [25.0, 44.0],
        },
    }
    lines = bench_triggers.table(report).splitlines()
    assert lines[-1] == "| without jobs.jobs_guard | 25 µs (+5) | 44 µs (+6) |"
    assert lines[-2] == "| without triggers | 10 µs | 20 µs |"
