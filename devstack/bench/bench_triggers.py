"""`python -m devstack bench --only triggers`: what the triggers on jobs cost a job's insert and claim.

A job's insert and its claim are the hot path: the plug-in's `generate` inserts with the service role
(its charge found and linked), a signed-in user may insert through the plug-in's policies (quotas,
the guard), and every attempt starts with claim_job. Each is timed here on one database with the
migrations and the plug-in's token tables (so the charge link does its real work), one statement per
transaction as PostgREST runs them, in these shapes:

- after: the schema as it is;
- before: as it was before issue 30 folded the generation columns' guard into jobs_guard (a second
  BEFORE INSERT OR UPDATE trigger, devstack/sql/bench_jobs_guard_generation_before_fold.sql);
- without triggers: every trigger on jobs and job_attempts disabled, the bare statements;
- each trigger disabled in turn: what that one trigger adds is after's time minus this.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg

from devstack.database import EmbeddedPostgres, apply_sql, migrate

BEFORE_FOLD = "sql/bench_jobs_guard_generation_before_fold.sql"
USERS = 50  # jobs spread over users as in production: a user has a few live jobs, not thousands
PRICE = 9  # what generate charges a 10 s designer job at its standard quality (stored as medium)

# The plug-in's token tables in the shape its code uses (PLUGIN.md); only what the charge link reads.
PLUGIN_CREDIT_TABLES = """
create table public.user_tokens (
  user_id uuid primary key, balance integer not null default 0, lifetime_used integer not null default 0,
  updated_at timestamptz not null default now());
create table public.token_transactions (
  id uuid primary key default gen_random_uuid(), user_id uuid not null, amount integer not null,
  type text not null, description text, created_at timestamptz not null default now());
create index on public.token_transactions (user_id, created_at desc);
insert into public.sona_settings (key, value)
  values ('max_active_jobs', 1000000), ('max_jobs_per_day', 1000000);
"""

# The triggers a job's insert or claim runs, by what they do (the name in the table is the trigger's).
HOT_TRIGGERS = (
    ("jobs", "jobs_charge_link"),
    ("jobs", "jobs_guard"),
    ("jobs", "jobs_normalize_quality"),
    ("jobs", "jobs_derive_stage"),
    ("jobs", "jobs_remember_wait_status"),
    ("jobs", "sona_enforce_quota"),
    ("jobs", "jobs_set_updated_at"),
    ("jobs", "sona_stats_unfold_inserted"),
    ("job_attempts", "sona_stats_unfold_inserted"),
    ("job_attempts", "job_attempts_outcome_class"),
)
OPERATIONS = ("service-role insert (generate, charged)", "signed-in user's insert", "claim_job")


@contextmanager
def _database(work: Path) -> Iterator[str]:
    server = EmbeddedPostgres(work / "data")
    server.start()
    try:
        url = server.create_database("triggers")
        migrate(url)
        apply_sql(url, PLUGIN_CREDIT_TABLES)
        yield url
    finally:
        server.stop()


# The loops run inside the server (one call each), so the figures are the statements' own cost
# without a client round trip per statement; each insert and claim is still its own statement, and
# its statement-level triggers fire once per statement as they would under PostgREST.
LOOPS = """
create function pg_temp.bench_service_inserts(p_users uuid[], p_n integer, p_price integer)
returns double precision language plpgsql as $$
declare t0 timestamptz; spent interval := '0'; u uuid;
begin
  for i in 1..p_n loop
    u := p_users[1 + i % array_length(p_users, 1)];
    insert into public.token_transactions (user_id, amount, type, description)
    values (u, -p_price, 'usage', 'Designer (10s, medium): "rain on a tin roof"');
    t0 := clock_timestamp();
    insert into public.jobs (user_id, prompt, duration, quality, mode, status)
    values (u, 'rain on a tin roof', 10, 'medium', 'designer', 'queued');
    spent := spent + (clock_timestamp() - t0);
  end loop;
  return extract(epoch from spent) * 1e6 / p_n;
end $$;
create function pg_temp.bench_user_inserts(p_users uuid[], p_n integer)
returns double precision language plpgsql as $$
declare t0 timestamptz; spent interval := '0'; u uuid;
begin
  for i in 1..p_n loop
    u := p_users[1 + i % array_length(p_users, 1)];
    perform set_config('request.jwt.claims', json_build_object('sub', u)::text, true);
    t0 := clock_timestamp();
    insert into public.jobs (user_id, prompt, duration) values (u, 'rain', 10);
    spent := spent + (clock_timestamp() - t0);
  end loop;
  return extract(epoch from spent) * 1e6 / p_n;
end $$;
create function pg_temp.bench_claims(p_ids uuid[])
returns double precision language plpgsql as $$
declare t0 timestamptz; spent interval := '0'; j uuid;
begin
  foreach j in array p_ids loop
    t0 := clock_timestamp();
    perform public.claim_job(j, gen_random_uuid(), 60, 3);
    spent := spent + (clock_timestamp() - t0);
  end loop;
  return extract(epoch from spent) * 1e6 / array_length(p_ids, 1);
end $$;
"""


def _round(url: str, n: int) -> list[float]:
    """Microseconds per operation: service-role insert, user insert, claim (of the service's jobs)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("truncate public.jobs, public.token_transactions, auth.users cascade")
        conn.execute(LOOPS)  # type: ignore[arg-type]  # a constant script
        users = [r[0] for r in conn.execute(
            "insert into auth.users (email) select 'u' || i || '@example.com' from generate_series(1, %s) i"
            " returning id", (USERS,)).fetchall()]  # fmt: skip
        with conn.transaction():
            conn.execute("set local role service_role")
            service = conn.execute(
                "select pg_temp.bench_service_inserts(%s, %s, %s)", (users, n, PRICE)
            ).fetchone()
        with conn.transaction():
            conn.execute("set local role authenticated")
            user = conn.execute("select pg_temp.bench_user_inserts(%s, %s)", (users, n)).fetchone()
        ids = [r[0] for r in conn.execute("select id from public.jobs where status = 'queued'").fetchall()]
        with conn.transaction():
            conn.execute("set local role service_role")
            claim = conn.execute("select pg_temp.bench_claims(%s)", (ids,)).fetchone()
    assert service is not None and user is not None and claim is not None
    return [service[0], user[0], claim[0]]


def _shapes(url: str) -> dict[str, tuple[str, str]]:
    """Each shape as (setup, undo) on the migrated database."""
    before = resources.files("devstack").joinpath(BEFORE_FOLD).read_text()
    bare = (
        "alter table public.jobs disable trigger user; alter table public.job_attempts disable trigger user"
    )
    shapes = {
        "after (issue 30: one guard)": ("select 1", "select 1"),
        "before (guard and generation guard)": (
            before,
            "drop trigger jobs_guard_generation on public.jobs; drop function public.jobs_guard_generation()",
        ),
        "without triggers": (bare, bare.replace("disable", "enable")),
    }
    for table, trigger in HOT_TRIGGERS:
        off = f"alter table public.{table} disable trigger {trigger}"
        shapes[f"without {table}.{trigger}"] = (off, off.replace("disable", "enable"))
    return shapes


def run(work: Path, n: int = 300, rounds: int = 7) -> dict[str, Any]:
    """Every shape once per round, in turn, so a busy machine slows them alike; the fastest round of
    each is kept (the least disturbed measure of the statements' own cost)."""
    with _database(work) as url:
        shapes = _shapes(url)
        _round(url, 50)  # warm the caches and plans
        seen: dict[str, list[list[float]]] = {name: [] for name in shapes}
        for _ in range(rounds):
            for name, (setup, undo) in shapes.items():
                apply_sql(url, setup)
                try:
                    seen[name].append(_round(url, n))
                finally:
                    apply_sql(url, undo)
    best = {name: [round(min(r[i] for r in runs), 1) for i in range(len(OPERATIONS))]
            for name, runs in seen.items()}  # fmt: skip
    return {"operations": list(OPERATIONS), "per_op_us": best, "ops_per_round": n, "rounds": rounds}


def table(report: dict[str, Any]) -> str:
    """Markdown: each shape's time per operation, and what each trigger adds to the schema as it is."""
    after = report["per_op_us"]["after (issue 30: one guard)"]
    head = "| shape | " + " | ".join(report["operations"]) + " |"
    lines = [head, "|---" * (len(report["operations"]) + 1) + "|"]
    for shape, figures in report["per_op_us"].items():
        cells = []
        for value, base in zip(figures, after, strict=True):
            one_off = shape.startswith("without ") and shape != "without triggers"
            added = f" ({base - value:+.0f})" if one_off else ""
            cells.append(f"{value:.0f} µs{added}")
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
