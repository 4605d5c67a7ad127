"""The real plug-in's database as a test fixture: its newest schema and rows (plugin_schema.sql,
plugin_rows.sql), and the reads its UI, its admin page, its landing page and its cleanup make.

Reads go where the plug-in sends them: table reads over SQL in the role PostgREST would use (the
local gateway serves only RPC and inserts on tables), signed URLs through the local Storage with
the user's own token, as supabase-js's createSignedUrl does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from devstack.database import apply_sql, stand_ins_sql
from devstack.emulators.gateway import Gateway
from devstack.emulators.user_jwt import make_user_jwt
from devstack.stack import LocalStack
from tests.support import RELAY_PAUSE_S, connect, sql

HERE = Path(__file__).resolve().parent
SCHEMA_SQL = HERE / "plugin_schema.sql"
ROWS_SQL = HERE / "plugin_rows.sql"

MUSICIAN = uuid.UUID("11111111-1111-4111-8111-111111111111")
OTHER_MUSICIAN = uuid.UUID("22222222-2222-4222-8222-222222222222")
ADMIN = uuid.UUID("33333333-3333-4333-8333-333333333333")

OLD_PENDING = uuid.UUID("a0000000-0000-4000-8000-000000000001")  # mode 'ambient', December
QUEUED_DESIGNER = uuid.UUID("a0000000-0000-4000-8000-000000000002")
PROCESSING_PRODUCER = uuid.UUID("a0000000-0000-4000-8000-000000000003")
COMPLETED_CREATOR = uuid.UUID("a0000000-0000-4000-8000-000000000004")  # public, in the showcase
EXPIRED_DESIGNER = uuid.UUID("a0000000-0000-4000-8000-000000000005")  # completed 2 days ago
FAILED_DESIGNER = uuid.UUID("a0000000-0000-4000-8000-000000000006")
OTHERS_PRODUCER = uuid.UUID("a0000000-0000-4000-8000-000000000007")
ALL_JOBS = (
    OLD_PENDING,
    QUEUED_DESIGNER,
    PROCESSING_PRODUCER,
    COMPLETED_CREATOR,
    EXPIRED_DESIGNER,
    FAILED_DESIGNER,
    OTHERS_PRODUCER,
)
# Balances after the welcome bonus (500) and the January charges in plugin_rows.sql.
START_BALANCE = {MUSICIAN: 410, OTHER_MUSICIAN: 470, ADMIN: 500}

AUDIO_BUCKET = "audio-files"
PUBLIC_BUCKET = "public-audio"
# The retention the cleanup Edge Function applies (cleanup-expired-audio/index.ts, 8688feb).
CLEANUP_HOURS = 24
CLEANUP_BATCH = 50


def build_plugin_database(url: str, *, rows: bool = True) -> None:
    """Supabase's stand-ins, the plug-in's schema, and (unless told not) its rows."""
    scripts = [stand_ins_sql(), SCHEMA_SQL.read_text()]
    if rows:
        scripts.append(ROWS_SQL.read_text())
    apply_sql(url, *scripts)


# ------------------------------------------------------------------------------------------ reads
@contextmanager
def plugin_stack(
    root: Path, pg_server: str, env: Mapping[str, str], reclaim_function: bool = True
) -> Iterator[LocalStack]:
    """The whole local stack on the plug-in's database (its schema and rows, then the migrations),
    with room for ten live jobs per musician (its rows already hold three, the default quota);
    without the reclaim_jobs process if the module never calls it."""
    with LocalStack(
        root,
        env=env,
        before_migrations=build_plugin_database,
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
        reclaim_function=reclaim_function,
    ) as running:
        sql(running.database_url, "insert into sona_settings values ('max_active_jobs', 10)", role=None)
        yield running


def owner_reads_job(url: str, user_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any] | None:
    """The UI's poll: `from('jobs').select('*').eq('id', jobId)` with the user's token."""
    with connect(url, "authenticated", user_id) as conn:
        row = conn.execute("select * from public.jobs where id = %s", (job_id,)).fetchone()
    return dict(row) if row else None


def my_sounds(url: str, user_id: uuid.UUID, limit: int = 50) -> list[dict[str, Any]]:
    """ "My Sounds": the user's newest jobs (select *, newest first, 50), kept when completed with a
    preview_path (use-jobs.ts useCompletedJobs filters after the read)."""
    with connect(url, "authenticated", user_id) as conn:
        rows = conn.execute(
            "select * from public.jobs order by created_at desc limit %s", (limit,)
        ).fetchall()
    return [dict(r) for r in rows if r["status"] == "completed" and r["preview_path"] is not None]


def showcase(url: str, limit: int = 12) -> list[dict[str, Any]]:
    """The landing page's public showcase, as anon (jobs.ts getPublicShowcaseJobs)."""
    with connect(url, "anon") as conn:
        rows = conn.execute(
            "select id, prompt, enhanced_prompt, filename, mode, duration, created_at, public_path"
            "  from public.jobs where public = true and status = 'completed' and public_path is not null"
            " order by created_at desc limit %s",
            (limit,),
        ).fetchall()
    return [dict(r) for r in rows]


def admin_reads_jobs(url: str, admin_id: uuid.UUID, limit: int = 20) -> list[dict[str, Any]]:
    """The admin dashboard's recent jobs (admin.ts getRecentJobs) with the admin's token."""
    with connect(url, "authenticated", admin_id) as conn:
        rows = conn.execute(
            "select id, user_id, user_email, mode, status, prompt, duration, skip_naming, quality,"
            "       created_at, completed_at, error_message"
            "  from public.jobs order by created_at desc limit %s",
            (limit,),
        ).fetchall()
    return [dict(r) for r in rows]


def cleanup_selection(
    url: str, hours: int = CLEANUP_HOURS, batch: int = CLEANUP_BATCH
) -> list[dict[str, Any]]:
    """What the cleanup Edge Function selects with the service role before deleting objects."""
    with connect(url, "service_role") as conn:
        rows = conn.execute(
            "select id, master_path, preview_path, completed_at from public.jobs"
            " where status = 'completed' and completed_at < now() - make_interval(hours => %s)"
            "   and (master_path is not null or preview_path is not null) limit %s",
            (hours, batch),
        ).fetchall()
    return [dict(r) for r in rows]


def balance(url: str, user_id: uuid.UUID) -> int:
    with connect(url) as conn:
        row = conn.execute("select balance from public.user_tokens where user_id = %s", (user_id,)).fetchone()
    assert row is not None
    return int(row["balance"])


def transactions(url: str, user_id: uuid.UUID) -> list[dict[str, Any]]:
    """The user's token transactions, oldest first (ties by type, so a charge precedes its refund)."""
    with connect(url) as conn:
        rows = conn.execute(
            "select amount, type, description, created_at from public.token_transactions"
            " where user_id = %s order by created_at, type desc",
            (user_id,),
        ).fetchall()
    return [dict(r) for r in rows]


# ------------------------------------------------------------------------------------------ storage
def _user_headers(gateway: Gateway, user_id: uuid.UUID) -> dict[str, str]:
    return {
        "apikey": gateway.anon_key,
        "Authorization": f"Bearer {make_user_jwt(gateway.jwt_secret, user_id)}",
    }


def store_plugin_audio(gateway: Gateway, url: str, audio: bytes) -> None:
    """Put an object behind every path the rows name, as the old worker left them: the WAV in the
    private bucket at master_path (= preview_path), the shared copy in the public bucket."""
    headers = {"apikey": gateway.service_role_key, "Authorization": f"Bearer {gateway.service_role_key}"}
    with connect(url) as conn:
        rows = conn.execute(
            "select master_path, preview_path, public_path from public.jobs"
            " where master_path is not null or preview_path is not null or public_path is not null"
        ).fetchall()
    objects = set()
    for row in rows:
        objects |= {(AUDIO_BUCKET, row[p]) for p in ("master_path", "preview_path") if row[p]}
        if row["public_path"]:
            objects.add((PUBLIC_BUCKET, row["public_path"]))
    for bucket, name in sorted(objects):
        answer = requests.post(
            f"{gateway.url}/storage/v1/object/{bucket}/{name}",
            data=audio,
            headers={**headers, "Content-Type": "audio/wav", "x-upsert": "true"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text


def sign_preview(gateway: Gateway, user_id: uuid.UUID, path: str) -> requests.Response:
    """`storage.from('audio-files').createSignedUrl(preview_path, 3600)` with the user's token."""
    return requests.post(
        f"{gateway.url}/storage/v1/object/sign/{AUDIO_BUCKET}/{path}",
        json={"expiresIn": 3600},
        headers=_user_headers(gateway, user_id),
        timeout=10,
    )


def fetch_signed(gateway: Gateway, signed_url: str) -> requests.Response:
    """The player's GET of a signed URL (relative to /storage/v1, as Storage answers it)."""
    return requests.get(f"{gateway.url}/storage/v1{signed_url}", timeout=10)


def public_url(gateway: Gateway, public_path: str) -> str:
    """The showcase's audio URL, built by the UI from the public bucket's path."""
    return f"{gateway.url}/storage/v1/object/public/{PUBLIC_BUCKET}/{public_path}"
