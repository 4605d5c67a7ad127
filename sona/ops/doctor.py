"""`python -m sona doctor --database-url URL`: the grants on a Supabase database that let anon or a
signed-in user mint or spend tokens, change configuration, or clear audio paths (the plug-in's own
SECURITY DEFINER functions and tables among them), each with the SQL that closes it.

Run it before `supabase db push`: this project's migrations close only what this project turns into
harm (the plug-in's cleanup_expired_audio_paths, whose cleared paths our garbage collection deletes);
the plug-in's token functions and app_config are the plug-in's own interface (its payment webhook and
admin page call add_user_tokens), so their owner applies the printed SQL once their callers use the
service role. The query is read-only (sona/ops/sql/doctor.sql)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Finding:
    kind: str  # function | table
    object: str
    roles: str  # the API roles that hold the grant
    problem: str
    fix: str  # SQL that closes it


def doctor_sql() -> str:
    return resources.files("sona.ops").joinpath("sql/doctor.sql").read_text()


def find_holes(database_url: str) -> list[Finding]:
    """The findings, from one read-only transaction. psycopg is a development dependency: the
    doctor runs from an operator's checkout, never in the deployed function."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        conn.read_only = True
        rows = conn.execute(doctor_sql()).fetchall()  # type: ignore[arg-type]
    return [Finding(*row) for row in rows]


def render(findings: list[Finding]) -> str:
    if not findings:
        return (
            "No grant lets anon or a signed-in user mint or spend tokens, change configuration"
            " or clear audio paths."
        )
    lines = [f"{len(findings)} grant(s) to close before deploying:"]
    for f in findings:
        lines += ["", f"{f.kind} {f.object}", f"  held by: {f.roles}", f"  problem: {f.problem}", "  fix:"]
        lines += [f"    {line}" for line in f.fix.splitlines()]
    return "\n".join(lines)
