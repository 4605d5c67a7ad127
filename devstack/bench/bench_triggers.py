"""`python -m devstack bench --only triggers`: what the triggers on jobs cost a job's insert and claim.

A job's insert and its claim are the hot path: the plug-in's `generate` inserts with the service role
(its charge found and linked; a user's own insert is refused there), and every attempt starts with
claim_job. Each is timed here on one database with the migrations and the plug-in's token tables
(so the charge link does its real work), each insert and claim its own statement, in these shapes:

- after: the schema as it is;
- before: as it was before issue 30 folded the generation columns' guard into jobs_guard (a second
  BEFORE INSERT OR UPDATE trigger, devstack/sql/bench_jobs_guard_generation_before_fold.sql);
- without triggers: every trigger on jobs and job_attempts disabled, the bare statements;
and, in the first two, each trigger function's own time per call as the server counts it
(track_functions), which a busy machine disturbs far less than a difference between two runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

from devstack.database import EmbeddedPostgres, apply_sql, migrate

BEFORE_FOLD = "sql/bench_jobs_guard_generation_before_fold.sql"
USERS = 50  # jobs spread over users as in production: a user has a few live jobs, not thousands
PRICE = 9  # what generate charges a 10 s designer job at its standard quality (stored as medium)

# The plug-in's token tables in the shape its code uses (docs/plugin-client.md); only what the
# charge link reads.
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

# A signed-in user's own insert is refused where the plug-in's token tables exist (jobs come from
# generate, issue 29), so the hot path is generate's insert and the claim.
OPERATIONS = ("service-role insert (generate, charged)", "claim_job")
AFTER = "after (issue 30: one guard)"
BEFORE = "before (guard and generation guard)"
# The calls and time of every function a trigger on jobs or job_attempts runs, this transaction.
TRIGGER_FUNCTION_CALLS = """
select f.funcname, f.calls, f.total_time from pg_stat_xact_user_functions f
 where f.funcid in (select t.tgfoid from pg_trigger t where not t.tgisinternal
                     and t.tgrelid in ('public.jobs'::regclass, 'public.job_attempts'::regclass))
"""


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


class Round(NamedTuple):
    per_op_us: list[float]  # service-role insert, claim
    functions: dict[str, tuple[int, float]]  # each function called: calls, total microseconds


def _round(url: str, n: int) -> Round:
    """One transaction: n charged service-role inserts and n claims of them, with every trigger
    function's calls and time counted by the server (track_functions)."""
    with psycopg.connect(url) as conn:
        conn.execute("set local track_functions = 'pl'")
        conn.execute("truncate public.jobs, public.token_transactions, auth.users cascade")
        conn.execute(LOOPS)  # type: ignore[arg-type]  # a constant script
        users = [r[0] for r in conn.execute(
            "insert into auth.users (email) select 'u' || i || '@example.com' from generate_series(1, %s) i"
            " returning id", (USERS,)).fetchall()]  # fmt: skip
        conn.execute("set local role service_role")
        service = conn.execute(
            "select pg_temp.bench_service_inserts(%s, %s, %s)", (users, n, PRICE)
        ).fetchone()
        conn.execute("reset role")
        ids = [r[0] for r in conn.execute("select id from public.jobs where status = 'queued'").fetchall()]
        conn.execute("set local role service_role")
        claim = conn.execute("select pg_temp.bench_claims(%s)", (ids,)).fetchone()
        conn.execute("reset role")
        functions = {
            name: (calls, total_ms * 1000)
            for name, calls, total_ms in conn.execute(TRIGGER_FUNCTION_CALLS).fetchall()
        }
    assert service is not None and claim is not None
    return Round([service[0], claim[0]], functions)


def _shapes() -> dict[str, tuple[str, str]]:
    """Each shape as (setup, undo) on the migrated database."""
    before = resources.files("devstack").joinpath(BEFORE_FOLD).read_text()
    bare = (
        "alter table public.jobs disable trigger user; alter table public.job_attempts disable trigger user"
    )
    return {
        AFTER: ("select 1", "select 1"),
        BEFORE: (
            before,
            "drop trigger jobs_guard_generation on public.jobs; drop function public.jobs_guard_generation()",
        ),
        "without triggers": (bare, bare.replace("disable", "enable")),
    }


def run(work: Path, n: int = 300, rounds: int = 7) -> dict[str, Any]:
    """Every shape once per round, in turn, so a busy machine slows them alike; of each figure the
    fastest round is kept (the least disturbed measure of the statements' own cost). Each trigger
    function's time per call is the server's own count (its total time, what it calls included)."""
    shapes = _shapes()
    with _database(work) as url:
        _round(url, 50)  # warm the caches and plans
        seen: dict[str, list[Round]] = {name: [] for name in shapes}
        for _ in range(rounds):
            for name, (setup, undo) in shapes.items():
                apply_sql(url, setup)
                try:
                    seen[name].append(_round(url, n))
                finally:
                    apply_sql(url, undo)
    per_op = {name: [round(min(r.per_op_us[i] for r in runs), 1) for i in range(len(OPERATIONS))]
              for name, runs in seen.items()}  # fmt: skip
    per_call = {
        name: {
            fn: round(min(r.functions[fn][1] / r.functions[fn][0] for r in runs if fn in r.functions), 1)
            for fn in {fn for r in runs for fn in r.functions}
        }
        for name, runs in seen.items()
        if name != "without triggers"
    }
    calls = {fn: c for r in seen[BEFORE][:1] for fn, (c, _) in r.functions.items()}
    return {
        "operations": list(OPERATIONS),
        "per_op_us": per_op,
        "trigger_us_per_call": per_call,
        "trigger_calls_per_round": calls,
        "ops_per_round": n,
        "rounds": rounds,
    }


def table(report: dict[str, Any]) -> str:
    """Markdown: each shape's time per operation; then each trigger function's time per call, the
    slowest first."""
    ops = report["operations"]
    lines = ["| shape | " + " | ".join(ops) + " |", "|---" * (len(ops) + 1) + "|"]
    for shape, figures in report["per_op_us"].items():
        lines.append(f"| {shape} | " + " | ".join(f"{v:.0f} µs" for v in figures) + " |")
    shapes = list(report["trigger_us_per_call"])
    lines += ["", "| trigger function | calls per round | " + " | ".join(shapes) + " |",
              "|---|---:" + "|---:" * len(shapes) + "|"]  # fmt: skip
    first = report["trigger_us_per_call"][shapes[0]]
    slowest = sorted(report["trigger_calls_per_round"], key=lambda fn: -first.get(fn, 0.0))
    for fn in slowest:
        cells = [report["trigger_us_per_call"][s].get(fn) for s in shapes]
        shown = [f"{c:.0f} µs" if c is not None else "-" for c in cells]
        lines.append(f"| {fn} | {report['trigger_calls_per_round'][fn]} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
