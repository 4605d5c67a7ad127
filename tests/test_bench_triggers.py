"""The trigger benchmark (`python -m devstack bench --only triggers`, issue 30): every shape it
measures leaves the schema as it found it, and each operation it times really inserts or claims."""

from __future__ import annotations

from devstack.bench import bench_triggers
from devstack.database import apply_sql
from tests.schema_catalog import catalog
from tests.support import sql


def test_every_shape_is_undone(private_db_url: str) -> None:
    before = catalog(private_db_url)
    for setup, undo in bench_triggers._shapes().values():
        apply_sql(private_db_url, setup)
        apply_sql(private_db_url, undo)
    assert catalog(private_db_url) == before


def test_a_round_charges_inserts_and_claims_every_job(private_db_url: str) -> None:
    apply_sql(private_db_url, bench_triggers.PLUGIN_CREDIT_TABLES)
    measured = bench_triggers._round(private_db_url, 4)
    assert len(measured.per_op_us) == len(bench_triggers.OPERATIONS)
    assert all(f > 0 for f in measured.per_op_us)
    rows = sql(private_db_url, "select status, count(*) as n from jobs group by 1 order by 1", role=None)
    assert rows == [{"status": "processing", "n": 4}]
    linked = sql(private_db_url, "select count(transaction_id) as n from sona_job_charges", role=None)
    assert linked == [{"n": 4}]
    # every insert ran the charge link; every insert and claim derived its stage; the guard's WHEN
    # clause skipped it for the service role's inserts and for claims, which set a new lease
    assert measured.functions["jobs_charge_link"][0] == 4
    assert measured.functions["jobs_derive_stage"][0] == 8
    assert "jobs_guard" not in measured.functions


def test_the_tables_show_each_shape_and_each_trigger_function() -> None:
    report = {
        "operations": ["insert", "claim"],
        "per_op_us": {"after": [30.0, 50.0], "without triggers": [10.0, 20.0]},
        "trigger_us_per_call": {"after": {"jobs_guard": 2.0, "jobs_charge_link": 900.0}},
        "trigger_calls_per_round": {"jobs_guard": 8, "jobs_charge_link": 4},
    }
    lines = bench_triggers.table(report).splitlines()
    assert lines[2:4] == ["| after | 30 µs | 50 µs |", "| without triggers | 10 µs | 20 µs |"]
    assert lines[-2:] == ["| jobs_charge_link | 4 | 900 µs |", "| jobs_guard | 8 | 2 µs |"]
