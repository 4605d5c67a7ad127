"""`dev --database-url URL` on an existing PostgreSQL that already holds Supabase's schemas and rows,
as a copy of production does (issue 19, item 7): Supabase's roles and schemas are added only where
missing, the migrations are applied on top, no row is dropped or duplicated, and the stack then
serves jobs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from devstack.events import UNWATCHED_POLL_S
from devstack.stack import prepare_database, without_password
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A copy of a Supabase database restored on a plain PostgreSQL, in this test's own words: auth and
# storage as Supabase's services made them (more columns than the local stand-ins have, no default
# id on auth.users, the real auth.uid() with its comment), a private bucket with an object, the
# webhook audit table with past rows, the earlier worker's jobs table with jobs in three states,
# and no pg_net (its extension cannot be restored here).
PRODUCTION_COPY = """
create schema auth;
create table auth.users (
  instance_id uuid, id uuid not null primary key, aud varchar(255), role varchar(255),
  email varchar(255), encrypted_password varchar(255), raw_user_meta_data jsonb,
  created_at timestamptz, updated_at timestamptz, is_anonymous boolean not null default false);
create function auth.uid() returns uuid language sql stable as $$
  select coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                  (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid
$$;
comment on function auth.uid() is 'Deprecated. Use auth.jwt() -> ''sub'' instead.';
insert into auth.users (id, aud, role, email, created_at) values
  ('00000000-0000-0000-0000-000000000001', 'authenticated', 'authenticated', 'a@example.com', now()),
  ('00000000-0000-0000-0000-000000000002', 'authenticated', 'authenticated', 'b@example.com', now());

create schema storage;
create table storage.buckets (
  id text primary key, name text not null, owner uuid, created_at timestamptz default now(),
  updated_at timestamptz default now(), public boolean default false,
  avif_autodetection boolean default false, file_size_limit bigint, allowed_mime_types text[],
  owner_id text);
create table storage.objects (
  id uuid primary key default gen_random_uuid(), bucket_id text references storage.buckets (id),
  name text, owner uuid, created_at timestamptz default now(), updated_at timestamptz default now(),
  last_accessed_at timestamptz default now(), metadata jsonb,
  path_tokens text[] generated always as (string_to_array(name, '/')) stored, version text,
  owner_id text, user_metadata jsonb);
create unique index bucketid_objname on storage.objects (bucket_id, name);
alter table storage.objects enable row level security;
create function storage.foldername(name text) returns text[] language plpgsql as $f$
declare _parts text[];
begin
  select string_to_array(name, '/') into _parts;
  return _parts[1:array_length(_parts, 1) - 1];
end $f$;
insert into storage.buckets (id, name, public) values ('audio-files', 'audio-files', false);
insert into storage.objects (bucket_id, name, metadata, version) values
  ('audio-files', 'generated/old.mp3', '{"size": 3, "mimetype": "audio/mpeg"}', 'v1');

create schema supabase_functions;
create table supabase_functions.hooks (
  id bigserial primary key, hook_table_id integer not null, hook_name text not null,
  created_at timestamptz not null default now(), request_id bigint);
insert into supabase_functions.hooks (hook_table_id, hook_name, request_id)
  values (1, 'old_hook', 7), (1, 'old_hook', 8);

create table public.jobs (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users(id),
  prompt text not null,
  duration integer not null default 10 check (duration >= 1 and duration <= 60),
  quality text not null default 'medium' check (quality in ('low','medium','high')),
  mode text not null default 'default',
  status text not null default 'pending'
    check (status in ('pending','queued','processing','completed','failed')),
  created_at timestamptz default now(), updated_at timestamptz default now(),
  completed_at timestamptz, error_message text, result_url text, wav_url text, mp3_url text);
alter table public.jobs enable row level security;
create policy "Users can view own jobs" on public.jobs for select using (auth.uid() = user_id);
insert into public.jobs (user_id, prompt, status, completed_at, mp3_url, error_message) values
  ('00000000-0000-0000-0000-000000000001', 'old done', 'completed', now(), 'https://x/old.mp3', null),
  ('00000000-0000-0000-0000-000000000001', 'old failed', 'failed', null, null, 'The audio was refused'),
  ('00000000-0000-0000-0000-000000000002', 'old waiting', 'pending', null, null, null);
"""

KEPT = {
    "users": "select id::text, email from auth.users order by id",
    "buckets": "select id, public::text from storage.buckets order by id",
    "objects": "select bucket_id, name, version from storage.objects order by name",
    "hooks": "select id::text, hook_name, request_id::text from supabase_functions.hooks order by id",
    "jobs": "select id::text, prompt, status, mp3_url, error_message from public.jobs order by prompt",
    "uid": "select md5(pg_get_functiondef('auth.uid()'::regprocedure)), obj_description("
    "'auth.uid()'::regprocedure, 'pg_proc')",
}


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {name: conn.execute(query).fetchall() for name, query in KEPT.items()}  # type: ignore[arg-type]


def contains(after: list[tuple[Any, ...]], before: list[tuple[Any, ...]]) -> bool:
    return set(before) <= set(after) and len(set(after)) == len(after)


@pytest.fixture
def production_copy(empty_db_url: str) -> str:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_COPY)  # type: ignore[arg-type]
    return empty_db_url


def test_dev_on_a_copy_of_production_keeps_every_row_and_serves_jobs(production_copy: str) -> None:
    before = snapshot(production_copy)
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack", "dev", "--json", "--database-url", production_copy],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO / ".sona")},
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert info["database_url"] == without_password(production_copy)
        during = snapshot(production_copy)
        # What was there is all still there, once each; Supabase's own definitions were kept.
        for name in ("users", "objects", "hooks"):
            assert contains(during[name], before[name]), name
        assert during["uid"] == before["uid"]
        assert during["buckets"] == [*before["buckets"], ("audio-inputs", "false")]  # the migration's own
        assert during["jobs"] == before["jobs"]  # no status, result or message changed
        # The stack serves a job the signed-in user inserts, as the plug-in does.
        as_user = {"apikey": info["publishable_key"], "Authorization": f"Bearer {info['user_token']}"}
        inserted = requests.post(
            f"{info['supabase_url']}/rest/v1/jobs",
            json={"user_id": info["user_id"], "prompt": "on a copy of production", "duration": 1},
            headers={**as_user, "Prefer": "return=representation"},
            timeout=10,
        )
        assert inserted.status_code == 201, inserted.text
        job_id = inserted.json()[0]["id"]

        def status() -> str:
            with psycopg.connect(production_copy) as conn:
                row = conn.execute("select status from public.jobs where id = %s", (job_id,)).fetchone()
            assert row is not None
            return str(row[0])

        # The stack runs in the `dev` process over the operator's database: no change of it is
        # reported here (no trigger may go into that database), so this looks every 50 ms.
        wait_until(lambda: status() in ("completed", "failed"), timeout_s=60, poll_s=UNWATCHED_POLL_S)
        assert status() == "completed"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    # Stopped: the database and its rows stay; preparing it again adds and removes nothing.
    stopped = snapshot(production_copy)
    prepare_database(production_copy)
    assert snapshot(production_copy) == stopped
    for name in ("users", "objects", "hooks", "jobs"):
        assert contains(stopped[name], before[name]), name
    assert len(stopped["jobs"]) == len(before["jobs"]) + 1  # the one it served
