-- Sona's schema, as one migration: the jobs table and its state machine, quotas, pauses, operator
-- figures, token refunds, retention and the inputs bucket. It replaces the fourteen migrations of
-- 2026-11-28 to 2026-12-02, which were never deployed. From here on a change is a new small
-- migration plus the same change in supabase/schemas/, where each object is written once by area;
-- tests/test_schema_agreement.py proves the two give the same database.
--
-- Safe where a jobs table already exists (the plug-in's, with its rows, policies, grants and
-- triggers, or the earlier worker's): nothing of its owner's is dropped and no row's request, status,
-- mode or results change. Idempotent: applying it again changes nothing. Valid on PostgreSQL 15 and
-- newer; needs Supabase's auth and storage schemas and the roles anon, authenticated, service_role.
-- Each section below is the schema file named under its title, written to run on an existing
-- database too (if not exists, or replace, drop-then-create policies); the upgrade of an existing
-- jobs table follows its create, and rows from before this migration are brought up at the end.

-- The plug-in's generate inserts into jobs while this runs: give up on a lock rather than queue
-- every insert behind a wait (the deploy is then retried), and never run on unbounded.
set lock_timeout = '10s';
set statement_timeout = '5min';

-- jobs --------------------------------------------------------------------------------------------
-- (supabase/schemas/10_jobs.sql)

-- The jobs table: what a musician asks for, what the worker made of it, and where each attempt is.
-- The plug-in (JaimeAlonsoGA/sona-plugin, PLUGIN.md) inserts into it with its `generate` Edge
-- Function and reads it back; the earlier worker's clients use the same table. Valid on PostgreSQL
-- 15 and newer; needs Supabase's auth schema and the roles anon, authenticated and service_role.

create table if not exists public.jobs (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  -- the request (prompt at most the provider's 10000 characters; duration up to stable-audio-3's 380 s)
  prompt text not null constraint jobs_prompt_length check (char_length(prompt) <= 10000),
  duration integer not null default 10 constraint jobs_duration_check check (duration between 1 and 380),
  quality text not null default 'medium' constraint jobs_quality_check check (quality in ('low', 'medium', 'high')),
  -- no check on mode: a mode the function does not know fails its job with a message
  -- (sona/modes.py), never the insert (the plug-in has charged its tokens by then)
  mode text not null default 'default',
  status text not null default 'pending' constraint jobs_status_check
    check (status in ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled')),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  completed_at timestamptz,
  error_message text,
  -- the earlier worker's results: URLs (result_url = mp3_url)
  result_url text,
  wav_url text,
  mp3_url text,
  -- the attempt: how many were counted, the lease that fences every write of the running one
  attempts integer not null default 0,
  lease_token uuid,
  lease_expires_at timestamptz,
  run_after timestamptz,
  dispatched_at timestamptz,
  started_at timestamptz,
  -- what the stored audio is (duration, format, model, peaks_url)
  audio jsonb,
  -- a finishing attempt: it completes the job from files a paid attempt stored, never pays
  reuse_only boolean not null default false,
  -- dispatch rounds: Cloud Tasks keeps a task's name reserved, so each dispatch names a new one
  dispatches integer not null default 0,
  cancelled_at timestamptz,
  -- when an outage first sent the job back to wait; a job waiting too long fails as unavailable
  waiting_since timestamptz,
  -- audio-to-audio: the input's object name in the inputs bucket, and how far to move from it
  input_path text,
  strength double precision constraint jobs_strength_range check (strength is null or (strength >= 0 and strength <= 1)),
  -- what the plug-in shows while a job runs, and the waveform peaks file's URL
  stage text not null default 'queued' constraint jobs_stage_check check (stage in (
    'queued', 'claimed', 'generating', 'encoding', 'uploading', 'done', 'failed', 'cancelled')),
  peaks_url text,
  -- the plug-in's request columns: JSON objects, or JSON strings holding them (as generate stores them)
  musical_key jsonb,       -- {"key","scale"}
  producer_config jsonb,   -- {"type","bpm","timeSignature","bars"}
  naming_convention jsonb, -- {"parameters": [...], "separator"}
  skip_naming boolean default false,
  user_email text,
  -- what the plug-in's player reads: the exact prompt sent, the download name, the object names
  enhanced_prompt text,
  filename text,
  master_path text,        -- the WAV in the output bucket
  preview_path text,       -- the MP3 (the player signs it)
  public boolean default false,
  public_path text,
  -- what a waiting job shows: 'queued' for the plug-in, 'pending' for the earlier worker's clients
  wait_status text constraint jobs_wait_status_check check (wait_status in ('pending', 'queued')),
  -- the paid generation's id (Stable Audio 3 answers it before the audio), fetched again by every
  -- later attempt; and how many ids expired before their audio was stored (each paid again)
  generation_id text,
  generation_model text,
  generation_posted_at timestamptz,
  generations_lost integer not null default 0,
  constraint jobs_audio_to_audio_input
    check (mode <> 'audio-to-audio' or (input_path is not null and length(input_path) between 1 and 1024))
);

-- A table that already exists (the plug-in's, or the earlier worker's) keeps its columns, checks,
-- policies, grants, triggers and rows; it gains what this project needs. Checks are added NOT VALID
-- where old rows might not meet them, and validated where they must.
alter table public.jobs
  add column if not exists attempts integer not null default 0,
  add column if not exists lease_token uuid,
  add column if not exists lease_expires_at timestamptz,
  add column if not exists run_after timestamptz,
  add column if not exists dispatched_at timestamptz,
  add column if not exists started_at timestamptz,
  add column if not exists audio jsonb,
  add column if not exists reuse_only boolean not null default false,
  add column if not exists dispatches integer not null default 0,
  add column if not exists cancelled_at timestamptz,
  add column if not exists waiting_since timestamptz,
  add column if not exists input_path text,
  add column if not exists strength double precision,
  add column if not exists stage text not null default 'queued',
  add column if not exists peaks_url text,
  add column if not exists musical_key jsonb,
  add column if not exists producer_config jsonb,
  add column if not exists naming_convention jsonb,
  add column if not exists skip_naming boolean default false,
  add column if not exists user_email text,
  add column if not exists enhanced_prompt text,
  add column if not exists filename text,
  add column if not exists master_path text,
  add column if not exists preview_path text,
  add column if not exists public boolean default false,
  add column if not exists public_path text,
  add column if not exists wait_status text,
  add column if not exists generation_id text,
  add column if not exists generation_model text,
  add column if not exists generation_posted_at timestamptz,
  add column if not exists generations_lost integer not null default 0;

-- The status check, whatever its name (the plug-in's valid_status, the earlier worker's), becomes
-- ours with 'cancelled'. Rows already there all pass the wider check.
do $$
declare con record;
begin
  for con in
    select c.conname from pg_constraint c
     where c.conrelid = 'public.jobs'::regclass and c.contype = 'c'
       and c.conkey = array[(select a.attnum from pg_attribute a
                              where a.attrelid = 'public.jobs'::regclass and a.attname = 'status')]
       and (c.conname <> 'jobs_status_check' or pg_get_constraintdef(c.oid) not like '%cancelled%')
  loop
    execute format('alter table public.jobs drop constraint %I', con.conname);
  end loop;
  if not exists (select from pg_constraint where conrelid = 'public.jobs'::regclass
                  and conname = 'jobs_status_check') then
    alter table public.jobs add constraint jobs_status_check
      check (status in ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled'));
  end if;
end $$;

-- The earlier worker's duration check (jobs_duration_check, 1 to 60 s) takes stable-audio-3's 380 s.
-- The plug-in's own check (valid_duration, 1 to 180) is the plug-in's and stays: its rows never ask
-- for more than 180 s.
do $$ begin
  if exists (select from pg_constraint where conrelid = 'public.jobs'::regclass
              and conname = 'jobs_duration_check' and pg_get_constraintdef(oid) not like '%380%') then
    alter table public.jobs drop constraint jobs_duration_check;
    alter table public.jobs add constraint jobs_duration_check check (duration between 1 and 380);
  end if;
end $$;

-- The checks this project adds, where missing. The prompt limit is NOT VALID, so rows written before
-- it stay as they are (the worker fails an oversized one without paying) and every new row obeys it;
-- the others hold for every row already there (their columns were added above, empty or at their
-- defaults).
do $$
declare c record;
begin
  for c in
    select * from (values
      ('jobs_prompt_length', 'check (char_length(prompt) <= 10000) not valid'),
      ('jobs_strength_range', 'check (strength is null or (strength >= 0 and strength <= 1))'),
      ('jobs_audio_to_audio_input',
       'check (mode <> ''audio-to-audio'' or (input_path is not null and length(input_path) between 1 and 1024))'),
      ('jobs_stage_check', 'check (stage in (''queued'', ''claimed'', ''generating'', ''encoding'', ''uploading'','
                           ' ''done'', ''failed'', ''cancelled''))'),
      ('jobs_wait_status_check', 'check (wait_status in (''pending'', ''queued''))')
    ) as wanted (name, definition)
  loop
    if not exists (select from pg_constraint where conrelid = 'public.jobs'::regclass and conname = c.name) then
      execute format('alter table public.jobs add constraint %I %s', c.name, c.definition);
    end if;
  end loop;
end $$;

-- Serve claim (by id), the expired-lease scan, the due-pending scan, a user's list and job_stats'
-- window by creation.
create index if not exists jobs_processing_lease_idx on public.jobs (lease_expires_at) where status = 'processing';
create index if not exists jobs_claimable_idx on public.jobs (created_at) where status in ('pending', 'queued');
create index if not exists jobs_status_created_idx on public.jobs (status, created_at);
create index if not exists jobs_user_idx on public.jobs (user_id, created_at desc);
create index if not exists jobs_created_idx on public.jobs (created_at);

-- One row per attempt, so an operator can see why a job failed three times: its outcome, the class
-- of its failure and its step timings, written by the same fenced call that ends it.
create table if not exists public.job_attempts (
  job_id uuid not null references public.jobs (id) on delete cascade,
  attempt integer not null,
  lease_token uuid not null,
  started_at timestamptz not null default now(),
  finished_at timestamptz,
  outcome text constraint job_attempts_outcome_check
    check (outcome in ('completed', 'failed', 'released', 'lease_expired', 'stale', 'cancelled', 'paused')),
  error text,
  timings_ms jsonb,
  outcome_class text constraint job_attempts_outcome_class_check check (outcome_class in
    ('provider_permanent', 'provider_transient', 'storage', 'timeout', 'account', 'database', 'internal')),
  primary key (job_id, attempt)
);
-- job_stats reads attempts by start; the ones still running keep an hour from settling.
create index if not exists job_attempts_started_idx on public.job_attempts (started_at);
create index if not exists job_attempts_open_started_idx on public.job_attempts (started_at) where outcome is null;

-- What one reclaim did: a row per job it touched (the attempt and dispatch round name a dispatch's
-- task; null for the other actions).
do $$ begin
  create type public.reclaim_action as (job_id uuid, action text, attempt integer, dispatch_round integer);
exception when duplicate_object then null;
end $$;

-- Row level security: users read and create their own jobs; the worker owns everything else. A
-- table that already has other owners' policies (the plug-in's own-row, admin and showcase ones)
-- keeps them; results stay the worker's whatever they allow (jobs_guard, 20_job_rows.sql).
alter table public.jobs enable row level security;
alter table public.job_attempts enable row level security;

drop policy if exists jobs_select_own on public.jobs;
create policy jobs_select_own on public.jobs for select to authenticated
  using ((select auth.uid()) = user_id);
drop policy if exists jobs_insert_own on public.jobs;
create policy jobs_insert_own on public.jobs for insert to authenticated
  with check ((select auth.uid()) = user_id and status = 'pending');

-- A user may read their rows and name the request columns; anon gets nothing. On a table this
-- project created (no other owner's policies, so no other owner's grants to keep) that is all they
-- may do; on an existing table nothing is taken away.
do $$ begin
  if not exists (select from pg_policies where schemaname = 'public' and tablename = 'jobs'
                  and policyname not in ('jobs_select_own', 'jobs_insert_own')) then
    revoke all on public.jobs from anon;
    revoke insert, update, delete, truncate on public.jobs from authenticated;
  end if;
end $$;
grant select on public.jobs to authenticated;
grant insert (id, user_id, prompt, duration, quality, mode, input_path, strength) on public.jobs to authenticated;
revoke all on public.job_attempts from anon, authenticated;
grant all on public.jobs, public.job_attempts to service_role;

-- settings ----------------------------------------------------------------------------------------
-- (supabase/schemas/15_settings.sql)

-- Settings an operator changes without a migration (an insert or update as the service role); a
-- missing row means the default written in sona_setting().

create table if not exists public.sona_settings (
  key text primary key constraint sona_settings_key_check check (key in (
    'max_active_jobs', 'max_jobs_per_day', 'pause_seconds', 'pause_max_wait_seconds',
    'keep_outputs_per_user', 'legacy_processing_timeout_seconds')),
  value integer not null check (value >= 0),
  updated_at timestamptz not null default now()
);
alter table public.sona_settings enable row level security;
-- Users may read the limits (the plug-in can show them); only the service role writes.
drop policy if exists sona_settings_read on public.sona_settings;
create policy sona_settings_read on public.sona_settings for select to authenticated using (true);
revoke all on public.sona_settings from public, anon, authenticated;
grant select on public.sona_settings to authenticated;
grant all on public.sona_settings to service_role;

create or replace function public.sona_setting(p_key text) returns integer
language sql stable security invoker set search_path = '' as $$
  select coalesce(
    (select s.value from public.sona_settings s where s.key = p_key),
    case p_key
      when 'max_active_jobs' then 3
      when 'max_jobs_per_day' then 100
      when 'pause_seconds' then 300
      when 'pause_max_wait_seconds' then 86400
      when 'keep_outputs_per_user' then 7            -- 0 keeps every output
      when 'legacy_processing_timeout_seconds' then 3600
    end)
$$;
-- Read by the quota trigger, which runs as the inserting user.
revoke all on function public.sona_setting(text) from public, anon;
grant execute on function public.sona_setting(text) to authenticated, service_role;

-- job rows ----------------------------------------------------------------------------------------
-- (supabase/schemas/20_job_rows.sql)

-- What every write of a job row goes through, whoever writes it: updated_at, the plug-in's quality
-- names, the status a waiting job shows, who may write what (jobs_guard), the stage, and the quotas
-- at insert. BEFORE triggers of one event fire in name order.

-- updated_at is kept by the database, whoever writes.
create or replace function public.jobs_set_updated_at() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end $$;
-- Where the table already has an updated_at trigger of its own (the plug-in's and the earlier
-- worker's update_jobs_updated_at), the migration leaves this one out: one is enough.
do $$ begin
  if exists (
    select from pg_trigger t
     where t.tgrelid = 'public.jobs'::regclass and not t.tgisinternal
       and t.tgname <> 'jobs_set_updated_at' and t.tgname ilike '%updated%at%'
       and (t.tgtype & 1) = 1 and (t.tgtype & 2) = 2 and (t.tgtype & 16) = 16) then  -- row, before, update
    drop trigger if exists jobs_set_updated_at on public.jobs;
  else
    create or replace trigger jobs_set_updated_at before update on public.jobs
      for each row execute function public.jobs_set_updated_at();
  end if;
end $$;

-- A data fix that leaves updated_at as it was (it is the best record of when a row was written):
-- every enabled updated_at trigger on jobs (ours or another owner's) is held off for the one
-- statement and enabled again, none dropped. For migrations and operators only.
create or replace function public.sona_backfill_jobs(p_statement text) returns void
language plpgsql set search_path = '' as $$
declare
  v_triggers text[];
  v_name text;
begin
  select coalesce(array_agg(t.tgname), '{}') into v_triggers from pg_trigger t
   where t.tgrelid = 'public.jobs'::regclass and not t.tgisinternal and t.tgenabled <> 'D'
     and t.tgname ilike '%updated%at%';
  foreach v_name in array v_triggers loop
    execute format('alter table public.jobs disable trigger %I', v_name);
  end loop;
  execute p_statement;
  foreach v_name in array v_triggers loop
    execute format('alter table public.jobs enable trigger %I', v_name);
  end loop;
end $$;
revoke all on function public.sona_backfill_jobs(text) from public, anon, authenticated;

-- generate's default quality is 'standard' and its UI says 'draft' for low; the table's check (the
-- plug-in's valid_quality, or ours) allows low, medium, high. BEFORE triggers run before checks.
create or replace function public.jobs_normalize_quality() returns trigger
language plpgsql set search_path = '' as $$
begin
  new.quality := case new.quality when 'standard' then 'medium' when 'draft' then 'low' else new.quality end;
  return new;
end $$;
create or replace trigger jobs_normalize_quality before insert or update of quality on public.jobs
  for each row execute function public.jobs_normalize_quality();

-- The status a waiting job shows is the one it was inserted with: a released or paused job goes
-- back to it ('queued' for the plug-in, whose UI knows no 'pending').
create or replace function public.jobs_remember_wait_status() returns trigger
language plpgsql set search_path = '' as $$
begin
  new.wait_status := case when new.status in ('pending', 'queued') then new.status end;
  return new;
end $$;
create or replace trigger jobs_remember_wait_status before insert on public.jobs
  for each row execute function public.jobs_remember_wait_status();

-- Rows inserted before wait_status existed have none: a plug-in mode waits as 'queued' (that is how
-- the plug-in inserts), anything else as 'pending'.
create or replace function public.sona_wait_status(p_wait_status text, p_mode text)
returns text language sql immutable set search_path = '' as $$
  select coalesce(p_wait_status,
                  case when p_mode in ('designer', 'producer', 'creator') then 'queued' else 'pending' end)
$$;

-- Who may write what. Only claim_job starts a job (it sets a new lease): any other write to
-- 'processing' from a waiting status (the plug-in's old worker) is skipped, so that writer reads
-- "already taken". A signed-in user (whatever the plug-in's policies allow) inserts only a plain
-- pending or queued request and never writes a job's status, results, lease or generation.
create or replace function public.jobs_guard() returns trigger
language plpgsql set search_path = '' as $$
begin
  -- Only claim_job starts a job: it sets a new lease. Any other write to 'processing' from a waiting
  -- status (the plug-in's old worker) is skipped, so that writer reads "already taken".
  if tg_op = 'UPDATE' and old.status in ('pending', 'queued') and new.status = 'processing'
     and new.lease_token is not distinct from old.lease_token then
    return null;
  end if;
  if current_user not in ('anon', 'authenticated') then
    return new;
  end if;
  if tg_op = 'INSERT' then
    if new.status not in ('pending', 'queued')
       or num_nonnulls(new.error_message, new.result_url, new.wav_url, new.mp3_url, new.master_path,
                       new.preview_path, new.filename, new.enhanced_prompt, new.audio, new.public_path,
                       new.lease_token, new.lease_expires_at, new.started_at, new.completed_at,
                       new.cancelled_at, new.generation_id, new.generation_model, new.generation_posted_at) > 0
       or new.attempts <> 0 or new.generations_lost <> 0 then
      raise exception using errcode = '42501',
        message = 'A new job starts pending or queued with no results; the worker writes those.',
        hint = 'sona_results_protected';
    end if;
  elsif (new.user_id, new.status, new.error_message, new.result_url, new.wav_url, new.mp3_url,
         new.master_path, new.preview_path, new.filename, new.enhanced_prompt, new.audio,
         new.public_path, new.attempts, new.lease_token, new.lease_expires_at, new.run_after,
         new.started_at, new.completed_at, new.cancelled_at, new.dispatched_at, new.wait_status,
         new.generation_id, new.generation_model, new.generation_posted_at, new.generations_lost)
        is distinct from
        (old.user_id, old.status, old.error_message, old.result_url, old.wav_url, old.mp3_url,
         old.master_path, old.preview_path, old.filename, old.enhanced_prompt, old.audio,
         old.public_path, old.attempts, old.lease_token, old.lease_expires_at, old.run_after,
         old.started_at, old.completed_at, old.cancelled_at, old.dispatched_at, old.wait_status,
         old.generation_id, old.generation_model, old.generation_posted_at, old.generations_lost) then
    raise exception using errcode = '42501',
      message = 'A job''s status and results are written by the worker, not by its owner.',
      hint = 'sona_results_protected';
  end if;
  return new;
end $$;
create or replace trigger jobs_guard before insert or update on public.jobs
  for each row execute function public.jobs_guard();
-- A database that ran the pre-baseline migrations locally had the generation columns guarded by a
-- trigger of their own; jobs_guard covers them now.
drop trigger if exists jobs_guard_generation on public.jobs;
-- squawk-ignore ban-drop-function
drop function if exists public.jobs_guard_generation();  -- nothing calls it but that trigger

-- The stage: queued -> claimed -> generating -> encoding -> uploading -> done (or failed,
-- cancelled). A status (or a new lease, which is a new attempt) sets it; advance_stage() writes the
-- three stages inside an attempt. Each is its own committed UPDATE, so Realtime pushes each.
-- peaks_url is copied from the audio info complete_job writes (not a generated column: logical
-- replication, which feeds Realtime, publishes generated columns only from PostgreSQL 18).

-- The order of the stages an attempt moves through; null for the others.
create or replace function public.sona_stage_rank(p_stage text)
returns integer language sql immutable set search_path = '' as $$
  select case p_stage when 'claimed' then 1 when 'generating' then 2
                      when 'encoding' then 3 when 'uploading' then 4 end
$$;

-- The stage a status implies (processing starts at claimed).
create or replace function public.sona_stage_of(p_status text)
returns text language sql immutable set search_path = '' as $$
  select case p_status when 'pending' then 'queued' when 'queued' then 'queued'
                       when 'processing' then 'claimed' when 'completed' then 'done'
                       when 'failed' then 'failed' when 'cancelled' then 'cancelled' end
$$;

create or replace function public.jobs_derive_stage() returns trigger
language plpgsql set search_path = '' as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status
     or new.lease_token is distinct from old.lease_token
     or new.status <> 'processing' then
    new.stage := coalesce(public.sona_stage_of(new.status), new.stage);
  elsif public.sona_stage_rank(new.stage) is null then
    new.stage := old.stage;
  end if;
  new.peaks_url := new.audio ->> 'peaks_url';
  return new;
end $$;
create or replace trigger jobs_derive_stage before insert or update on public.jobs
  for each row execute function public.jobs_derive_stage();

-- Quotas at insert for users (anon, authenticated); the service role and the database owner are
-- exempt (a charged insert from generate over quota is failed and refunded instead:
-- jobs_charge_link, 50_tokens.sql). A refused insert rolls back, and anything it wrote with it; a
-- sequence's nextval does not, so the refusals are counted there.
create sequence if not exists public.sona_refused_active_seq;
create sequence if not exists public.sona_refused_daily_seq;
revoke all on sequence public.sona_refused_active_seq, public.sona_refused_daily_seq from public, anon;
grant usage, select on sequence public.sona_refused_active_seq, public.sona_refused_daily_seq
  to authenticated, service_role;

-- Race-free: one user's inserts take turns on an advisory lock held to their commit, and the counts
-- are read after it (a new snapshot per statement), so N simultaneous inserts over the limit let
-- exactly the allowed number through. Codes: SQ001 too many active jobs, SQ002 too many in 24 h.
create or replace function public.sona_enforce_quota() returns trigger
language plpgsql volatile security invoker set search_path = '' as $$
declare
  v_active integer;
  v_day integer;
  v_max_active integer;
  v_max_day integer;
begin
  if current_user not in ('anon', 'authenticated') then
    return new;  -- the service role (the worker, an operator, an Edge Function with the secret key)
  end if;
  perform pg_advisory_xact_lock(hashtextextended('sona.quota:' || new.user_id::text, 0));
  v_max_active := public.sona_setting('max_active_jobs');
  v_max_day := public.sona_setting('max_jobs_per_day');
  select count(*) filter (where j.status in ('pending', 'queued', 'processing')),
         count(*) filter (where j.created_at > now() - interval '24 hours')
    into v_active, v_day
    from public.jobs j where j.user_id = new.user_id;
  if v_active >= v_max_active then
    perform nextval('public.sona_refused_active_seq');
    raise exception using
      errcode = 'SQ001',
      message = format('You have %s %s running; wait for one to finish.',
                       v_active, case when v_active = 1 then 'job' else 'jobs' end),
      detail = json_build_object('quota', 'max_active_jobs', 'limit', v_max_active, 'current', v_active)::text,
      hint = 'sona_quota_active';
  end if;
  if v_day >= v_max_day then
    perform nextval('public.sona_refused_daily_seq');
    raise exception using
      errcode = 'SQ002',
      message = format('You have started %s jobs in the last 24 hours, the most allowed; try again later.',
                       v_day),
      detail = json_build_object('quota', 'max_jobs_per_day', 'limit', v_max_day, 'current', v_day)::text,
      hint = 'sona_quota_daily';
  end if;
  return new;
end $$;
revoke all on function public.sona_enforce_quota() from public, anon;
grant execute on function public.sona_enforce_quota() to authenticated, service_role;
create or replace trigger sona_enforce_quota before insert on public.jobs
  for each row execute function public.sona_enforce_quota();

-- An attempt that ended with an expired lease timed out; one whose outcome is cleared (a claim
-- repeated after its answer was lost) loses its figures with it.
create or replace function public.job_attempts_outcome_class() returns trigger
language plpgsql set search_path = '' as $$
begin
  if new.outcome = 'lease_expired' and new.outcome_class is null then
    new.outcome_class := 'timeout';
  elsif new.outcome is null then
    new.outcome_class := null;
    new.timings_ms := null;
  end if;
  return new;
end $$;
create or replace trigger job_attempts_outcome_class before insert or update on public.job_attempts
  for each row execute function public.job_attempts_outcome_class();

-- state machine -----------------------------------------------------------------------------------
-- (supabase/schemas/30_state_machine.sql)

-- The state machine: pending | queued -> processing -> completed | failed | cancelled, and
-- processing -> pending | queued when an attempt is released for a retry or an outage. Every
-- transition is one call of one of these functions. claim_job stamps a lease; every later write of
-- the attempt (advance_stage, record_generation, forget_generation, complete_job, fail_job,
-- pause_service) is fenced by it, and zero rows means a stale worker whose result is dropped.

-- Exponential backoff with equal jitter, capped: attempt 1 waits base/2..base, attempt 2 base..2*base.
create or replace function public.sona_backoff(p_attempt integer, p_base_ms integer, p_cap_ms integer)
returns interval language sql volatile as $$
  select make_interval(secs => (
    least(p_cap_ms::double precision, p_base_ms * power(2, greatest(p_attempt - 1, 0)))
    * (0.5 + random() / 2)) / 1000.0)
$$;
revoke all on function public.sona_backoff(integer, integer, integer) from public, anon, authenticated;
grant execute on function public.sona_backoff(integer, integer, integer) to service_role;

-- A claim can be repeated: the request makes a claim id once and sends it with every try; the id
-- becomes the lease token, and a try whose claim already committed (its answer was lost) gets that
-- same lease back without counting another attempt. At most p_max_attempts attempts pay; after
-- them, an expired lease releases the job for finishing attempts (reuse_only) that complete it from
-- the files a paid attempt stored, or fail it, and never pay.
-- May a job with these attempts be claimed again: while paid attempts remain, then (reuse_only)
-- for at most as many finishing attempts.
create or replace function public.sona_may_claim(
  p_attempts integer, p_reuse_only boolean, p_max_attempts integer)
returns boolean language sql immutable set search_path = '' as $$
  select p_attempts < p_max_attempts or (p_reuse_only and p_attempts < 2 * p_max_attempts)
$$;
revoke all on function public.sona_may_claim(integer, boolean, integer) from public, anon, authenticated;
grant execute on function public.sona_may_claim(integer, boolean, integer) to service_role;

-- Account-level outages pause the service: pause_service() records one open pause and releases the
-- job without using up its attempt; claim_job claims nothing while paused, then lets one probe
-- through; the probe's completion lifts the pause.
create table if not exists public.sona_pauses (
  id bigint generated always as identity primary key,
  open_slot smallint not null default 1 check (open_slot = 1),
  code text not null,
  reason text not null,
  since timestamptz not null default now(),
  until timestamptz not null,
  probe_job uuid,
  probe_claimed_at timestamptz,
  jobs_released integer not null default 0,
  lifted_at timestamptz,
  lifted_by uuid
);
-- At most one open pause: however many instances see the outage at once, one row is written.
create unique index if not exists sona_pauses_one_open on public.sona_pauses (open_slot) where lifted_at is null;
alter table public.sona_pauses enable row level security;
revoke all on public.sona_pauses from public, anon, authenticated;
grant all on public.sona_pauses to service_role;

-- May a claim go ahead: no open pause; or the pause has ended and no other probe is running.
-- Locks the open pause row (only while one exists), so two claims never both become the probe.
create or replace function public.sona_pause_admits(p_job_id uuid)
returns table (admitted boolean, probe_of bigint)
language plpgsql volatile security invoker set search_path = '' as $$
declare
  v_pause public.sona_pauses;
begin
  select * into v_pause from public.sona_pauses p where p.lifted_at is null for update;
  if v_pause.id is null then
    return query select true, null::bigint;
  elsif v_pause.until > now() then
    return query select false, null::bigint;
  elsif v_pause.probe_job is not null and v_pause.probe_job <> p_job_id
        and exists (select from public.jobs j where j.id = v_pause.probe_job and j.status = 'processing') then
    return query select false, null::bigint;
  else
    return query select true, v_pause.id;
  end if;
end $$;
revoke all on function public.sona_pause_admits(uuid) from public, anon, authenticated;
grant execute on function public.sona_pause_admits(uuid) to service_role;

-- claim: one conditional UPDATE that counts the attempt and stamps the lease; zero rows means a
-- duplicate delivery, a finished job or a pause (then the repeated claim's own lease is answered, if
-- this claim id already holds it).
create or replace function public.claim_job(
  p_job_id uuid, p_claim_id uuid, p_lease_seconds integer, p_max_attempts integer)
returns setof public.jobs
language plpgsql volatile security invoker set search_path = '' as $$
declare
  v_admitted boolean;
  v_probe_of bigint;
begin
  select a.admitted, a.probe_of into v_admitted, v_probe_of from public.sona_pause_admits(p_job_id) a;

  if v_admitted then
    return query
    with claimed as (
      update public.jobs j
         set status = 'processing',
             attempts = j.attempts + 1,
             reuse_only = j.attempts >= p_max_attempts,
             lease_token = p_claim_id,
             lease_expires_at = now() + make_interval(secs => p_lease_seconds),
             started_at = now(),
             run_after = null,
             error_message = null
       where j.id = p_job_id
         and j.status in ('pending', 'queued')
         and public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
         and (j.run_after is null or j.run_after <= now())
      returning j.*
    ), attempt as (
      insert into public.job_attempts (job_id, attempt, lease_token, started_at)
      select c.id, c.attempts, c.lease_token, now() from claimed c
      on conflict (job_id, attempt) do update
        set lease_token = excluded.lease_token, started_at = excluded.started_at,
            finished_at = null, outcome = null, error = null
    )
    select * from claimed;
    if found then
      if v_probe_of is not null then  -- the one job that tries the service after the pause
        update public.sona_pauses p set probe_job = p_job_id, probe_claimed_at = now()
         where p.id = v_probe_of;
      end if;
      return;
    end if;
  end if;

  -- A new statement, so a new snapshot: it sees this claim id's commit even when that commit
  -- happened while the update above waited for the row (and whether or not a pause began since).
  return query
  select j.* from public.jobs j
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_claim_id;
end $$;
revoke all on function public.claim_job(uuid, uuid, integer, integer) from public, anon, authenticated;
grant execute on function public.claim_job(uuid, uuid, integer, integer) to service_role;

-- The stage write before generating is the last fence before a paid call. It already matches
-- nothing once the owner has cancelled the job (the cancel clears the lease), so the worker needs no
-- separate lease check: this says which of the two it was. A stale attempt still gets no row; a
-- cancelled job raises SQ003, which the worker reads as "cancelled", never as an error of its own.
create or replace function public.advance_stage(p_job_id uuid, p_lease_token uuid, p_stage text)
returns setof public.jobs
language plpgsql volatile security invoker set search_path = '' as $$
begin
  if p_stage not in ('generating', 'encoding', 'uploading') then
    raise exception 'advance_stage: % is not a stage of a running attempt', p_stage
      using errcode = '22023';
  end if;
  return query
  update public.jobs j
     set stage = p_stage
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
     and public.sona_stage_rank(j.stage) <= public.sona_stage_rank(p_stage)
  returning j.*;
  if not found and exists (select from public.jobs j where j.id = p_job_id and j.status = 'cancelled') then
    raise exception 'job % was cancelled by its owner', p_job_id using errcode = 'SQ003';
  end if;
end $$;
revoke all on function public.advance_stage(uuid, uuid, text) from public, anon, authenticated;
grant execute on function public.advance_stage(uuid, uuid, text) to service_role;

-- The id of the generation just paid for, on the row of the attempt that holds the lease. A row that
-- already names another id is left alone (the caller forgets the old one first); the same id again
-- is a no-op, so a retried write after a lost answer is safe. Answers the row, or nothing when stale.
create or replace function public.record_generation(
  p_job_id uuid, p_lease_token uuid, p_generation_id text, p_model text)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  update public.jobs j
     set generation_id = p_generation_id,
         generation_model = p_model,
         generation_posted_at = coalesce(j.generation_posted_at, now())
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
     and (j.generation_id is null or j.generation_id = p_generation_id)
  returning j.*
$$;
revoke all on function public.record_generation(uuid, uuid, text, text) from public, anon, authenticated;
grant execute on function public.record_generation(uuid, uuid, text, text) to service_role;

-- The provider no longer knows this id (expired or unknown): the only way to a new payment for a job
-- that had one. Counted, and fenced by the lease like record_generation.
create or replace function public.forget_generation(
  p_job_id uuid, p_lease_token uuid, p_generation_id text)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  update public.jobs j
     set generation_id = null,
         generation_model = null,
         generation_posted_at = null,
         generations_lost = j.generations_lost + 1
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
     and j.generation_id = p_generation_id
  returning j.*
$$;
revoke all on function public.forget_generation(uuid, uuid, text) from public, anon, authenticated;
grant execute on function public.forget_generation(uuid, uuid, text) to service_role;

-- complete: fenced by the lease; writes the earlier worker's URLs and what the plug-in's player reads
-- (master_path, preview_path, filename, enhanced_prompt), and the attempt keeps its timings. Then
-- the owner's outputs beyond their newest keep_outputs_per_user lose their paths (their files are
-- queued for deletion: jobs_queue_expired_files, 60_storage.sql), as the plug-in's old worker did.
create or replace function public.complete_job(
  p_job_id uuid, p_lease_token uuid, p_wav_url text, p_mp3_url text, p_audio jsonb,
  p_timings_ms jsonb default null, p_master_path text default null, p_preview_path text default null,
  p_filename text default null, p_enhanced_prompt text default null)
returns setof public.jobs
language plpgsql volatile security invoker set search_path = '' as $$
declare
  v_done public.jobs;
  v_keep integer := public.sona_setting('keep_outputs_per_user');
begin
  update public.jobs j
     set status = 'completed',
         wav_url = p_wav_url,
         mp3_url = p_mp3_url,
         result_url = p_mp3_url,
         audio = p_audio,
         master_path = p_master_path,
         preview_path = p_preview_path,
         filename = coalesce(p_filename, j.filename),
         enhanced_prompt = coalesce(p_enhanced_prompt, j.enhanced_prompt),
         completed_at = now(),
         error_message = null,
         lease_token = null,
         lease_expires_at = null
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
  returning j.* into v_done;
  if v_done.id is null then
    return;
  end if;
  update public.job_attempts a
     set finished_at = now(), outcome = 'completed', outcome_class = null, timings_ms = p_timings_ms
   where a.job_id = v_done.id and a.lease_token = p_lease_token;
  if v_keep > 0 and v_done.preview_path is not null and v_done.user_id is not null then
    update public.jobs j
       set master_path = null, preview_path = null
     where j.id in (select o.id from public.jobs o
                     where o.user_id = v_done.user_id and o.status = 'completed'
                       and (o.master_path is not null or o.preview_path is not null)
                     order by o.completed_at desc nulls last, o.id
                     offset v_keep);
  end if;
  return next v_done;
end $$;
revoke all on function public.complete_job(uuid, uuid, text, text, jsonb, jsonb, text, text, text, text) from public, anon, authenticated;
grant execute on function public.complete_job(uuid, uuid, text, text, jsonb, jsonb, text, text, text, text) to service_role;

-- fail: fenced like complete. A retryable failure goes back to wait (as the status the job was
-- inserted with) with backoff while attempts remain; otherwise the job fails with the message the
-- plug-in shows. The attempt keeps its timings and the class of its failure.
create or replace function public.fail_job(
  p_job_id uuid, p_lease_token uuid, p_error text, p_retryable boolean,
  p_max_attempts integer, p_base_delay_ms integer, p_max_delay_ms integer,
  p_outcome_class text default null, p_timings_ms jsonb default null)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  with ended as (
    update public.jobs j
       set status = case when p_retryable and public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
                         then public.sona_wait_status(j.wait_status, j.mode) else 'failed' end,
           run_after = case when p_retryable and public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
                            then now() + public.sona_backoff(j.attempts, p_base_delay_ms, p_max_delay_ms) end,
           error_message = case
             when p_retryable and not public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
             then p_error || ' (gave up after ' || j.attempts || ' attempts)'
             else p_error end,
           completed_at = case when p_retryable and public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
                               then null else now() end,
           dispatched_at = null,
           lease_token = null,
           lease_expires_at = null
     where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
    returning j.*
  ), attempt as (
    update public.job_attempts a
       set finished_at = now(),
           outcome = case when e.status in ('pending', 'queued') then 'released' else 'failed' end,
           error = p_error,
           outcome_class = p_outcome_class,
           timings_ms = p_timings_ms
      from ended e
     where a.job_id = e.id and a.lease_token = p_lease_token
  )
  select * from ended
$$;
revoke all on function public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb) from public, anon, authenticated;
grant execute on function public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb) to service_role;

-- pause: record the outage (once) and release the job for after the pause without using up its
-- attempt. A pause whose end has passed (its probe met the outage again) is re-armed. The release
-- is fenced like fail_job; the pause is recorded even for a stale lease (the account is at fault
-- either way). Answers the status the released job waits as.
create or replace function public.pause_service(
  p_job_id uuid, p_lease_token uuid, p_code text, p_reason text, p_message text, p_seconds integer)
returns table (pause_id bigint, pause_created boolean, paused_until timestamptz, released boolean,
               released_status text)
language plpgsql volatile security invoker set search_path = '' as $$
#variable_conflict use_column
declare
  v_until timestamptz := now() + make_interval(secs => coalesce(p_seconds, public.sona_setting('pause_seconds')));
  v_id bigint;
  v_created boolean := false;
  v_released boolean;
  v_status text;
begin
  for i in 1..2 loop  -- a second round only if the open pause was lifted in between
    insert into public.sona_pauses (code, reason, until)
    values (p_code, p_reason, v_until)
    on conflict (open_slot) where lifted_at is null do nothing
    returning id into v_id;
    if v_id is not null then
      v_created := true;
      exit;
    end if;
    update public.sona_pauses p
       set until = case when p.until <= now() then v_until else p.until end,
           code = case when p.until <= now() then p_code else p.code end,
           reason = case when p.until <= now() then p_reason else p.reason end,
           probe_job = case when p.until <= now() then null else p.probe_job end,
           probe_claimed_at = case when p.until <= now() then null else p.probe_claimed_at end
     where p.lifted_at is null
    returning p.id, p.until into v_id, v_until;
    exit when v_id is not null;
  end loop;

  with released as (
    update public.jobs j
       set status = public.sona_wait_status(j.wait_status, j.mode),
           attempts = greatest(j.attempts - 1, 0),
           run_after = v_until,
           waiting_since = coalesce(j.waiting_since, now()),
           error_message = p_message,
           dispatched_at = null,
           lease_token = null,
           lease_expires_at = null
     where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
    returning j.id, j.status
  ), attempt as (
    update public.job_attempts a
       set finished_at = now(), outcome = 'paused', error = p_code || ': ' || p_reason
      from released r
     where a.job_id = r.id and a.lease_token = p_lease_token
  )
  select count(*) > 0, min(r.status) into v_released, v_status from released r;

  if v_released then
    update public.sona_pauses p set jobs_released = p.jobs_released + 1 where p.id = v_id;
  end if;
  return query select v_id, v_created, v_until, v_released, v_status;
end $$;
revoke all on function public.pause_service(uuid, uuid, text, text, text, integer) from public, anon, authenticated;
grant execute on function public.pause_service(uuid, uuid, text, text, text, integer) to service_role;

-- A success lifts the pause: the completion of the probe the pause let through.
create or replace function public.sona_lift_pause() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
begin
  update public.sona_pauses p
     set lifted_at = now(), lifted_by = new.id
   where p.lifted_at is null and p.probe_job = new.id;
  return null;
end $$;
revoke all on function public.sona_lift_pause() from public, anon, authenticated;
grant execute on function public.sona_lift_pause() to service_role;
create or replace trigger sona_lift_pause after update of status on public.jobs
  for each row when (new.status = 'completed' and old.status is distinct from 'completed')
  execute function public.sona_lift_pause();

-- One call: the owner's (or the service role's) live job becomes 'cancelled' and loses its lease, so
-- every fenced write of its attempt matches nothing. Answers the cancelled row, or nothing: not the
-- caller's job, unknown, or already finished. Security definer because users have no UPDATE on
-- jobs; it checks the owner itself.
create or replace function public.cancel_job(p_job_id uuid)
returns setof public.jobs
language sql volatile security definer set search_path = '' as $$
  with cancelled as (
    update public.jobs j
       set status = 'cancelled',
           cancelled_at = now(),
           completed_at = now(),
           error_message = 'You cancelled this job.',
           run_after = null,
           dispatched_at = null,
           lease_token = null,
           lease_expires_at = null
     where j.id = p_job_id
       and j.status in ('pending', 'queued', 'processing')
       -- the owner, or the service role (by its JWT, or the role the session set: definer
       -- functions run as their owner, so current_user cannot tell)
       and (j.user_id = (select auth.uid())
            or coalesce(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role', '')
               = 'service_role'
            or current_setting('role', true) = 'service_role')
    returning j.*
  ), attempt as (
    update public.job_attempts a
       set finished_at = now(), outcome = 'cancelled', error = 'cancelled by its owner'
      from cancelled c
     where a.job_id = c.id and a.finished_at is null
  )
  select * from cancelled
$$;
revoke all on function public.cancel_job(uuid) from public, anon;
grant execute on function public.cancel_job(uuid) to authenticated, service_role;

-- reclaim: single-flight (a second concurrent call returns nothing), set-based, one statement per
-- kind of work:
--   'released'  expired lease, attempts (or finishing attempts) remain: back to wait, with backoff
--               counted from the lease's expiry (so it is also dispatched in the same call once due)
--   'failed'    expired lease with nothing left; the plug-in's old worker's job (processing with no
--               lease) once older than legacy_processing_timeout_seconds (never run again: it may
--               have paid); a waiting job with no attempts left; a job that waited out an outage
--               longer than pause_max_wait_seconds
--   'dispatch'  due now: a released retry past run_after, or a job whose webhook never came (after
--               the grace period), at most one per grace period, with its dispatch round; nothing
--               while paused, and one probe once the pause has ended
create or replace function public.reclaim_jobs(
  p_max_attempts integer, p_grace_seconds integer, p_limit integer,
  p_base_delay_ms integer, p_max_delay_ms integer)
returns setof public.reclaim_action
language plpgsql volatile security invoker set search_path = '' as $$
declare
  v_pause public.sona_pauses;
  v_limit integer := p_limit;
  v_max_wait interval := make_interval(secs => public.sona_setting('pause_max_wait_seconds'));
  v_legacy interval := make_interval(secs => public.sona_setting('legacy_processing_timeout_seconds'));
begin
  if not pg_try_advisory_xact_lock(hashtext('sona.reclaim_jobs')) then
    return;
  end if;

  return query
  with expired as (
    update public.jobs j
       set status = case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                         then public.sona_wait_status(j.wait_status, j.mode) else 'failed' end,
           reuse_only = j.attempts >= p_max_attempts,
           -- backoff counts from when the lease expired: a crash found late is due at once
           run_after = case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                            then j.lease_expires_at
                                 + public.sona_backoff(j.attempts, p_base_delay_ms, p_max_delay_ms) end,
           error_message = case
             when j.attempts < p_max_attempts then 'The attempt timed out; retrying.'
             when public.sona_may_claim(j.attempts, true, p_max_attempts)
             then 'The attempt timed out; looking for the audio it stored.'
             else 'The job timed out after ' || j.attempts || ' attempts.' end,
           completed_at = case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                               then null else now() end,
           dispatched_at = null,
           lease_token = null,
           lease_expires_at = null
     where j.status = 'processing' and j.lease_token is not null
       and (j.lease_expires_at is null or j.lease_expires_at < now())
    returning j.id, j.status
  ), expired_attempts as (
    update public.job_attempts a
       set finished_at = now(), outcome = 'lease_expired',
           error = 'lease expired: the invocation crashed or timed out'
      from expired e
     where a.job_id = e.id and a.finished_at is null
  )
  select e.id, case when e.status in ('pending', 'queued') then 'released' else 'failed' end,
         null::integer, null::integer
    from expired e;

  return query
  update public.jobs j
     set status = 'failed',
         error_message = 'The job did not finish; please try again.',
         completed_at = now()
   where j.status = 'processing' and j.lease_token is null
     and j.updated_at <= now() - v_legacy
  returning j.id, 'failed'::text, null::integer, null::integer;

  return query
  update public.jobs j
     set status = 'failed',
         error_message = coalesce(j.error_message, 'The job could not be processed')
                         || ' (no attempts left after ' || j.attempts || ')',
         completed_at = now()
   where j.status in ('pending', 'queued')
     and not public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
  returning j.id, 'failed'::text, null::integer, null::integer;

  select * into v_pause from public.sona_pauses p where p.lifted_at is null;

  -- Waited out an outage too long: the service, not the request, was at fault.
  return query
  update public.jobs j
     set status = 'failed',
         error_message = 'The audio service was unavailable for too long to make this audio; '
                         || 'nothing was wrong with your request. Please try again.',
         completed_at = now(),
         run_after = null
   where j.status in ('pending', 'queued')
     and (j.waiting_since <= now() - v_max_wait
          or (v_pause.id is not null and j.created_at <= now() - v_max_wait))
  returning j.id, 'failed'::text, null::integer, null::integer;

  if v_pause.id is not null then
    if v_pause.until > now()
       or (v_pause.probe_job is not null
           and exists (select from public.jobs j where j.id = v_pause.probe_job and j.status = 'processing')) then
      return;  -- paused, or its probe is running: dispatch nothing
    end if;
    v_limit := least(p_limit, 1);  -- the pause has ended: one probe first
  end if;

  return query
  with due as (
    select j.id from public.jobs j
     where j.status in ('pending', 'queued')
       and public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
       and (j.run_after is null or j.run_after <= now())
       -- a first attempt waits out the grace period so a webhook in flight is not raced
       and (j.attempts > 0 or j.waiting_since is not null
            or j.created_at <= now() - make_interval(secs => p_grace_seconds))
       -- one dispatch per grace period, so overlapping reclaims never send a job twice
       and (j.dispatched_at is null or j.dispatched_at <= now() - make_interval(secs => p_grace_seconds))
     order by coalesce(j.run_after, j.created_at)
     limit v_limit
     for update skip locked
  )
  update public.jobs j set dispatched_at = now(), dispatches = j.dispatches + 1
    from due where j.id = due.id
  returning j.id, 'dispatch'::text, j.attempts, j.dispatches;
end $$;
revoke all on function public.reclaim_jobs(integer, integer, integer, integer, integer) from public, anon, authenticated;
grant execute on function public.reclaim_jobs(integer, integer, integer, integer, integer) to service_role;

-- stats -------------------------------------------------------------------------------------------
-- (supabase/schemas/40_stats.sql)

-- What an operator watches (`python -m sona stats`): job_stats(), spend_stats(), generation_stats()
-- (token_stats() sits with the tokens, 50_tokens.sql).
--
-- job_stats() at full scale: a 24 h window can hold about 1,000,000 jobs (a day at the queue's top
-- rate). Counting them each time costs seconds however it is written, so settled hours are counted
-- once:
-- - sona_job_groups(from, to) and sona_attempt_groups(from, to) count the jobs created, and the
--   attempts started, in [from, to): by status, completions by minute, processing times,
--   first-attempt queue waits and attempts; provider and upload times, failures by class, and the
--   ended / provider-error totals.
-- - sona_fold_job_stats() stores those counts for each settled hour (it ended over a few minutes ago,
--   every job created in it finished, every attempt started in it ended). reclaim_jobs' scheduled
--   call and `python -m sona stats` run it; an hour is folded once.
-- - job_stats() adds the folded hours inside its window to what it still counts from the rows: the
--   window's first, partial hour, the current hour, and any hour not folded (still running, or not
--   folded yet). Its answer is the same whether or not any hour is folded.
--
-- Percentiles are read off counts per value (sona_percentile, interpolated as percentile_cont
-- does), with times at four significant digits (to the millisecond below 10 s, to 10 ms up to
-- 100 s, to 100 ms above), so a folded hour holds a few thousand distinct values per figure rather
-- than one per job; the rows still counted are rounded the same way, after counting. Hours are UTC
-- hours whatever the session's time zone. A row deleted, inserted into a folded hour, or changed
-- after it finished unfolds its hour (counted from the rows again until folded again). Attempt
-- figures count the attempts that started in the window; the first attempt's queue wait comes from
-- jobs.started_at for jobs that ran once, and from their attempt 1 for the others.

-- p_fraction's percentile, interpolated as percentile_cont does, of the values p_values (ascending)
-- each seen p_counts times.
create or replace function public.sona_percentile(
  p_values double precision[], p_counts bigint[], p_fraction double precision)
returns double precision
language sql immutable parallel safe set search_path = '' as $$
  with v as (
    select u.value, sum(u.n) over (order by u.i) as upto  -- how many values are <= this one
      from unnest(p_values, p_counts) with ordinality as u(value, n, i)
  ), pos as (
    select p_fraction * (sum(n) - 1) as at from unnest(p_counts) as c(n)
  )
  select lo.value + (pos.at - floor(pos.at)) * (hi.value - lo.value)
    from pos,
         lateral (select v.value from v where v.upto > floor(pos.at) order by v.upto limit 1) lo,
         lateral (select v.value from v where v.upto > ceil(pos.at) order by v.upto limit 1) hi
$$;
revoke all on function public.sona_percentile(double precision[], bigint[], double precision) from public, anon, authenticated;
grant execute on function public.sona_percentile(double precision[], bigint[], double precision) to service_role;

-- A time in milliseconds at four significant digits (to_char's scientific notation; it reads its
-- argument once). Applied to the keys of counts, never to each row.
create or replace function public.sona_stats_round(p_ms double precision)
returns double precision
language sql stable parallel safe as $$
  select to_char(p_ms, '9.999EEEE')::double precision
$$;
revoke all on function public.sona_stats_round(double precision) from public, anon, authenticated;
grant execute on function public.sona_stats_round(double precision) to service_role;

-- The counts job_stats() reads of the jobs created in [p_from, p_to): by status, completions by
-- minute, processing times, first-attempt queue waits, and attempts. Each row says which grouping
-- it belongs to; a key may come twice (the waits of jobs that ran once and of the others).
create or replace function public.sona_job_groups(p_from timestamptz, p_to timestamptz)
returns table (by_status boolean, by_minute boolean, by_processing boolean, by_wait boolean,
               by_attempts boolean, status text, minute timestamptz, processing_ms double precision,
               wait_ms double precision, attempts integer, n bigint)
language sql stable set search_path = '' as $$
  select grouping(x.status) = 0, grouping(x.minute) = 0, grouping(x.processing_ms) = 0,
         grouping(x.wait_ms) = 0, grouping(x.attempts) = 0,
         x.status, x.minute, x.processing_ms, x.wait_ms, x.attempts, count(*)
    from (select j.status, j.attempts,
                 case when j.status = 'completed' then date_trunc('minute', j.completed_at) end as minute,
                 case when j.status = 'completed' and j.started_at is not null
                      then round(date_part('epoch', j.completed_at - j.started_at) * 1000) end as processing_ms,
                 -- a job that ran once started its first attempt at started_at
                 case when j.attempts = 1 and j.started_at is not null
                      then round(date_part('epoch', j.started_at - j.created_at) * 1000) end as wait_ms
            from public.jobs j where j.created_at >= p_from and j.created_at < p_to) x
   group by grouping sets ((x.status), (x.minute), (x.processing_ms), (x.wait_ms), (x.attempts))
  union all
  -- the first attempt's wait of the jobs that ran more than once (about one in ten)
  select false, false, false, true, false, null, null, null, w.wait_ms, null, count(*)
    from (select round(date_part('epoch', a.started_at - j.created_at) * 1000) as wait_ms
            from public.jobs j
            cross join lateral (select f.started_at from public.job_attempts f
                                 where f.job_id = j.id and f.attempt = 1 limit 1) a
           where j.created_at >= p_from and j.created_at < p_to and j.attempts > 1) w
   group by w.wait_ms
$$;
revoke all on function public.sona_job_groups(timestamptz, timestamptz) from public, anon, authenticated;
grant execute on function public.sona_job_groups(timestamptz, timestamptz) to service_role;

-- The counts job_stats() reads of the attempts started in [p_from, p_to): provider and upload
-- times, failures by class, and the ended / provider-error totals.
create or replace function public.sona_attempt_groups(p_from timestamptz, p_to timestamptz)
returns table (by_generate boolean, by_upload boolean, by_class boolean, generate_ms double precision,
               upload_ms double precision, outcome_class text, ended boolean, provider_error boolean,
               n bigint)
language sql stable set search_path = '' as $$
  select grouping(y.generate_ms) = 0, grouping(y.upload_ms) = 0, grouping(y.outcome_class) = 0,
         y.generate_ms, y.upload_ms, y.outcome_class, y.ended, y.provider_error, count(*)
    from (select a.outcome is not null as ended, a.outcome_class,
                 (a.timings_ms ->> 'generate') is not null
                   and a.outcome_class in ('provider_permanent', 'provider_transient') as provider_error,
                 (a.timings_ms ->> 'generate')::double precision as generate_ms,
                 (a.timings_ms ->> 'upload')::double precision as upload_ms
            from public.job_attempts a where a.started_at >= p_from and a.started_at < p_to) y
   group by grouping sets ((y.generate_ms), (y.upload_ms), (y.outcome_class), (y.ended, y.provider_error))
$$;
revoke all on function public.sona_attempt_groups(timestamptz, timestamptz) from public, anon, authenticated;
grant execute on function public.sona_attempt_groups(timestamptz, timestamptz) to service_role;

-- The folded hours and their counts.
create table if not exists public.sona_stats_hours (
  hour timestamptz primary key,
  folded_at timestamptz not null default now()
);
create table if not exists public.sona_stats_job_groups (
  hour timestamptz not null references public.sona_stats_hours (hour) on delete cascade,
  by_status boolean not null, by_minute boolean not null, by_processing boolean not null,
  by_wait boolean not null, by_attempts boolean not null,
  status text, minute timestamptz, processing_ms double precision, wait_ms double precision,
  attempts integer, n bigint not null
);
create index if not exists sona_stats_job_groups_hour_idx on public.sona_stats_job_groups (hour);
create table if not exists public.sona_stats_attempt_groups (
  hour timestamptz not null references public.sona_stats_hours (hour) on delete cascade,
  by_generate boolean not null, by_upload boolean not null, by_class boolean not null,
  generate_ms double precision, upload_ms double precision, outcome_class text,
  ended boolean, provider_error boolean, n bigint not null
);
create index if not exists sona_stats_attempt_groups_hour_idx on public.sona_stats_attempt_groups (hour);
alter table public.sona_stats_hours enable row level security;
alter table public.sona_stats_job_groups enable row level security;
alter table public.sona_stats_attempt_groups enable row level security;
revoke all on public.sona_stats_hours, public.sona_stats_job_groups, public.sona_stats_attempt_groups
  from public, anon, authenticated;
grant all on public.sona_stats_hours, public.sona_stats_job_groups, public.sona_stats_attempt_groups
  to service_role;

-- Fold up to p_limit settled hours of the last 35 days (the newest first; an hour, in UTC whatever
-- the session's time zone, is settled once it ended over 5 minutes ago, a margin for transactions
-- still committing rows stamped inside it, with every job created in it finished and every attempt
-- started in it ended), drop folds older than that, and answer how many hours were folded. One
-- caller at a time: a second returns 0 at once.
create or replace function public.sona_fold_job_stats(p_limit integer default 48)
returns integer
language plpgsql security definer set search_path = '' as $$
declare
  v_hour timestamptz;
  v_folded integer := 0;
begin
  if not pg_try_advisory_xact_lock(hashtext('sona_fold_job_stats')) then
    return 0;
  end if;
  delete from public.sona_stats_hours where hour < date_trunc('hour', now() - interval '35 days', 'UTC');
  -- Every hour of the period is a candidate (an hour without jobs folds to nothing): each check
  -- below is an index probe, never a scan of the period's rows.
  for v_hour in
    select h.hour
      from generate_series(date_trunc('hour', now() - interval '35 days', 'UTC'),
                           now() - interval '1 hour 5 minutes', interval '1 hour') as h(hour)
     where not exists (select 1 from public.sona_stats_hours s where s.hour = h.hour)
       and not exists (select 1 from public.jobs j
                        where j.status in ('pending', 'queued', 'processing')
                          and j.created_at >= h.hour and j.created_at < h.hour + interval '1 hour')
       and not exists (select 1 from public.job_attempts a
                        where a.outcome is null
                          and a.started_at >= h.hour and a.started_at < h.hour + interval '1 hour')
     order by h.hour desc  -- the newest first: a short window is fast from the first call
     limit p_limit
  loop
    insert into public.sona_stats_hours (hour) values (v_hour);
    insert into public.sona_stats_job_groups
      select v_hour, g.by_status, g.by_minute, g.by_processing, g.by_wait, g.by_attempts, g.status,
             g.minute, public.sona_stats_round(g.processing_ms), public.sona_stats_round(g.wait_ms),
             g.attempts, sum(g.n)
        from public.sona_job_groups(v_hour, v_hour + interval '1 hour') g
       group by 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11;
    insert into public.sona_stats_attempt_groups
      select v_hour, g.by_generate, g.by_upload, g.by_class, public.sona_stats_round(g.generate_ms),
             public.sona_stats_round(g.upload_ms), g.outcome_class, g.ended, g.provider_error, sum(g.n)
        from public.sona_attempt_groups(v_hour, v_hour + interval '1 hour') g
       group by 1, 2, 3, 4, 5, 6, 7, 8, 9;
    v_folded := v_folded + 1;
  end loop;
  return v_folded;
end $$;
revoke all on function public.sona_fold_job_stats(integer) from public, anon, authenticated;
grant execute on function public.sona_fold_job_stats(integer) to service_role;

-- Rows that change a folded hour unfold it, so job_stats() never counts a row that is gone or has
-- moved: a deleted job or attempt, a finished job or ended attempt changed afterwards (a pause's
-- release, which reopens an attempt), and a row inserted with a time inside a folded hour; emptying
-- either table unfolds every hour. Each waits for a fold in progress first (the fold's lock), so a
-- fold cannot commit counts that still include the row. The time column is the trigger's argument.
create or replace function public.sona_stats_unfold_hours(p_hours timestamptz[])
returns void language plpgsql security definer set search_path = '' as $$
begin
  perform pg_advisory_xact_lock(hashtext('sona_fold_job_stats'));
  delete from public.sona_stats_hours where hour = any (p_hours);
end $$;
revoke all on function public.sona_stats_unfold_hours(timestamptz[]) from public, anon, authenticated;
grant execute on function public.sona_stats_unfold_hours(timestamptz[]) to service_role;

-- For a statement's deleted or inserted rows (the transition table "touched"). An insert, on the
-- hot path, looks before it locks: its rows are nearly always in the current hour, never folded.
create or replace function public.sona_stats_unfold()
returns trigger language plpgsql security definer set search_path = '' as $$
declare
  v_hours timestamptz[];
begin
  execute format('select array_agg(distinct date_trunc(''hour'', t.%I, ''UTC'')) from touched t', tg_argv[0])
    into v_hours;
  if tg_op = 'DELETE'
     or exists (select 1 from public.sona_stats_hours s where s.hour = any (v_hours)) then
    perform public.sona_stats_unfold_hours(v_hours);
  end if;
  return null;
end $$;
revoke all on function public.sona_stats_unfold() from public, anon, authenticated;
grant execute on function public.sona_stats_unfold() to service_role;
create or replace trigger sona_stats_unfold after delete on public.jobs
  referencing old table as touched for each statement execute function public.sona_stats_unfold('created_at');
create or replace trigger sona_stats_unfold after delete on public.job_attempts
  referencing old table as touched for each statement execute function public.sona_stats_unfold('started_at');
create or replace trigger sona_stats_unfold_inserted after insert on public.jobs
  referencing new table as touched for each statement execute function public.sona_stats_unfold('created_at');
create or replace trigger sona_stats_unfold_inserted after insert on public.job_attempts
  referencing new table as touched for each statement execute function public.sona_stats_unfold('started_at');

-- For one finished row changed afterwards (the triggers' conditions pick them out): the hour it
-- was in and the hour it is in now.
create or replace function public.sona_stats_unfold_row()
returns trigger language plpgsql security definer set search_path = '' as $$
declare
  v_hours timestamptz[];
begin
  execute format('select array[date_trunc(''hour'', ($1).%1$I, ''UTC''), date_trunc(''hour'', ($2).%1$I, ''UTC'')]',
                 tg_argv[0])
    into v_hours using old, new;
  perform public.sona_stats_unfold_hours(v_hours);
  return null;
end $$;
revoke all on function public.sona_stats_unfold_row() from public, anon, authenticated;
grant execute on function public.sona_stats_unfold_row() to service_role;
create or replace trigger sona_stats_unfold_changed
  after update of status, attempts, created_at, started_at, completed_at on public.jobs
  for each row when (old.status in ('completed', 'failed', 'cancelled'))
  execute function public.sona_stats_unfold_row('created_at');
create or replace trigger sona_stats_unfold_changed
  after update of started_at, outcome, outcome_class, timings_ms on public.job_attempts
  for each row when (old.outcome is not null)
  execute function public.sona_stats_unfold_row('started_at');

-- Emptying either table unfolds every hour.
create or replace function public.sona_stats_unfold_all()
returns trigger language plpgsql security definer set search_path = '' as $$
begin
  delete from public.sona_stats_hours;
  return null;
end $$;
revoke all on function public.sona_stats_unfold_all() from public, anon, authenticated;
grant execute on function public.sona_stats_unfold_all() to service_role;
create or replace trigger sona_stats_unfold_all after truncate on public.jobs
  for each statement execute function public.sona_stats_unfold_all();
create or replace trigger sona_stats_unfold_all after truncate on public.job_attempts
  for each statement execute function public.sona_stats_unfold_all();

-- Every figure an operator watches, for the jobs created in the window (and their attempts):
--   throughput       jobs completed per minute of the window, and the busiest minute
--   attempts         attempts ended, and failed attempts by class (share of attempts ended)
--   queue_wait_s     insert to the start of the first attempt
--   processing_s     start of the last attempt to completion, completed jobs
--   provider         the provider step's time (its in-attempt retries included), and the share of
--                    attempts that called it and failed with a provider class
--   storage          attempts that stored both files against those whose storage step failed, and
--                    the time from the WAV upload's start to the MP3 stored
--   retries          attempts beyond the first, per job that started
create or replace function public.job_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker
set search_path = ''
set work_mem = '64MB'
set hash_mem_multiplier = 4
as $$
  with since as (
    select now() - make_interval(hours => p_window_hours) as t
  ), hours as (
    -- each hour the window touches, and whether its counts are folded (only whole hours inside it)
    select h.hour,
           h.hour >= s.t and h.hour + interval '1 hour' <= now()
             and exists (select 1 from public.sona_stats_hours f where f.hour = h.hour) as folded
      from since s, generate_series(date_trunc('hour', s.t, 'UTC'), now(), interval '1 hour') as h(hour)
  ), raw_ranges as (
    -- the rest, as ranges of consecutive hours cut to the window (the last one open-ended)
    select greatest(min(r.hour), s.t) as lo,
           case when max(r.hour) = date_trunc('hour', now(), 'UTC') then 'infinity'::timestamptz
                else max(r.hour) + interval '1 hour' end as hi
      from (select hour, hour - (row_number() over (order by hour)) * interval '1 hour' as island
              from hours where not folded) r, since s
     group by r.island, s.t
  ), folded as (
    select hour from hours where folded
  ), jobs_g as (
    select by_status, by_minute, by_processing, by_wait, by_attempts, status, minute,
           public.sona_stats_round(processing_ms) as processing_ms,
           public.sona_stats_round(wait_ms) as wait_ms, attempts, sum(n)::bigint as n
      from (select g.* from raw_ranges r cross join lateral public.sona_job_groups(r.lo, r.hi) g
            union all
            select f.by_status, f.by_minute, f.by_processing, f.by_wait, f.by_attempts,
                   f.status, f.minute, f.processing_ms, f.wait_ms, f.attempts, f.n
              from public.sona_stats_job_groups f join folded using (hour)) u
     group by 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
  ), attempts_g as (
    select by_generate, by_upload, by_class, public.sona_stats_round(generate_ms) as generate_ms,
           public.sona_stats_round(upload_ms) as upload_ms, outcome_class, ended, provider_error,
           sum(n)::bigint as n
      from (select g.* from raw_ranges r cross join lateral public.sona_attempt_groups(r.lo, r.hi) g
            union all
            select f.by_generate, f.by_upload, f.by_class, f.generate_ms, f.upload_ms,
                   f.outcome_class, f.ended, f.provider_error, f.n
              from public.sona_stats_attempt_groups f join folded using (hour)) u
     group by 1, 2, 3, 4, 5, 6, 7, 8
  ), dist as (
    -- each time figure as ascending values (seconds) and how often each was seen
    select 'processing' as figure, array_agg(processing_ms / 1000 order by processing_ms) as v, array_agg(n order by processing_ms) as c
      from jobs_g where by_processing and processing_ms is not null
    union all
    select 'generate', array_agg(generate_ms / 1000 order by generate_ms), array_agg(n order by generate_ms)
      from attempts_g where by_generate and generate_ms is not null
    union all
    select 'upload', array_agg(upload_ms / 1000 order by upload_ms), array_agg(n order by upload_ms)
      from attempts_g where by_upload and upload_ms is not null
    union all
    select 'wait', array_agg(wait_ms / 1000 order by wait_ms), array_agg(n order by wait_ms)
      from jobs_g where by_wait and wait_ms is not null
  ), pct as (
    select d.figure,
           round(public.sona_percentile(d.v, d.c, 0.5)::numeric, 3) as p50,
           round(public.sona_percentile(d.v, d.c, 0.95)::numeric, 3) as p95,
           (select sum(x) from unnest(d.c) x) as seen
      from dist d where d.v is not null
  ), jt as (
    -- totals from the counts by attempts: every job is in exactly one
    select coalesce(sum(n), 0) as n,
           sum(n * (attempts - 1)) filter (where attempts > 0)::numeric
             / nullif(sum(n) filter (where attempts > 0), 0) as retries_avg,
           max(attempts - 1) filter (where attempts > 0) as retries_max,
           coalesce(sum(n) filter (where attempts > 1), 0) as retried,
           (select sum(processing_ms * n) / nullif(sum(n), 0) from jobs_g
             where by_processing and processing_ms is not null) as processing_avg_ms
      from jobs_g where by_attempts
  ), at as (
    select coalesce(sum(n) filter (where ended), 0) as ended,
           coalesce(sum(n) filter (where provider_error), 0) as provider_errors,
           (select coalesce(sum(n), 0) from attempts_g where by_class and outcome_class = 'storage') as storage_failed
      from attempts_g where not by_generate and not by_upload and not by_class
  ), per_minute as (
    select minute, n from jobs_g where by_minute and minute is not null
  ), ended as (
    select coalesce(sum(n) filter (where status = 'failed'), 0) as failed,
           coalesce(sum(n) filter (where status in ('completed', 'failed')), 0) as ended
      from jobs_g where by_status
  ), counts as (
    select (select seen from pct where figure = 'generate') as provider_calls,
           (select seen from pct where figure = 'upload') as stored
  )
  select jsonb_build_object(
    'window_hours', p_window_hours,
    'total', jt.n,
    'by_status', coalesce(
      (select jsonb_object_agg(status, n) from jobs_g where by_status), '{}'::jsonb),
    'failure_rate', case when e.ended = 0 then null else round(e.failed::numeric / e.ended, 4) end,
    'avg_processing_s', round((jt.processing_avg_ms / 1000)::numeric, 3),
    'p95_processing_s', (select p95 from pct where figure = 'processing'),
    'throughput', jsonb_build_object(
      'completed', coalesce((select sum(n) from per_minute), 0),
      'per_minute', round(coalesce((select sum(n) from per_minute), 0)::numeric / (p_window_hours * 60), 4),
      'busiest_minute', (select jsonb_build_object('minute', minute, 'completed', n)
                           from per_minute order by n desc, minute desc limit 1)),
    'attempts', jsonb_build_object(
      'ended', at.ended,
      'failed_by_class', coalesce(
        (select jsonb_object_agg(g.outcome_class, jsonb_build_object(
                  'count', g.n,
                  'rate', case when at.ended = 0 then null else round(g.n::numeric / at.ended, 4) end))
           from attempts_g g where g.by_class and g.outcome_class is not null),
        '{}'::jsonb)),
    'queue_wait_s', jsonb_build_object('p50', (select p50 from pct where figure = 'wait'),
                                       'p95', (select p95 from pct where figure = 'wait')),
    'processing_s', jsonb_build_object('p50', (select p50 from pct where figure = 'processing'),
                                       'p95', (select p95 from pct where figure = 'processing')),
    'provider', jsonb_build_object(
      'calls', coalesce(k.provider_calls, 0),
      'p50_s', (select p50 from pct where figure = 'generate'),
      'p95_s', (select p95 from pct where figure = 'generate'),
      'errors', at.provider_errors,
      'error_rate', case when coalesce(k.provider_calls, 0) = 0 then null
                         else round(at.provider_errors::numeric / k.provider_calls, 4) end),
    'storage', jsonb_build_object(
      'stored', coalesce(k.stored, 0),
      'failed', at.storage_failed,
      'success_rate', case when coalesce(k.stored, 0) + at.storage_failed = 0 then null
                           else round(k.stored::numeric / (k.stored + at.storage_failed), 4) end,
      'upload_p95_s', (select p95 from pct where figure = 'upload')),
    'retries', jsonb_build_object(
      'per_job', round(jt.retries_avg::numeric, 3), 'max', jt.retries_max, 'jobs_retried', jt.retried),
    'stuck', jsonb_build_object(
      'expired_leases', (select count(*) from public.jobs
                          where status = 'processing' and lease_expires_at < now()),
      'pending_over_10_min', (select count(*) from public.jobs
                               where status in ('pending', 'queued')
                                 and created_at < now() - interval '10 minutes')),
    'recent_failures', coalesce(
      (select jsonb_agg(jsonb_build_object('id', r.id, 'failed_at', r.completed_at, 'attempts', r.attempts,
                                           'error', r.error_message) order by r.completed_at desc)
         from (select j.id, j.completed_at, j.attempts, j.error_message
                 from public.jobs j, since
                where j.status = 'failed' and j.created_at >= since.t
                order by j.completed_at desc nulls last limit 10) r),
      '[]'::jsonb)
  )
  from jt, at, ended e, counts k
$$;
revoke all on function public.job_stats(integer) from public, anon, authenticated;
grant execute on function public.job_stats(integer) to service_role;

-- The pause, quota refusals (counted since the sequences were made: a refused insert leaves no row)
-- and cancellations.
create or replace function public.spend_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker set search_path = '' as $$
  select jsonb_build_object(
    'pause', (select jsonb_build_object('code', p.code, 'reason', p.reason, 'since', p.since,
                                        'until', p.until, 'probe_job', p.probe_job,
                                        'jobs_released', p.jobs_released)
                from public.sona_pauses p where p.lifted_at is null),
    'pauses_in_window', (select count(*) from public.sona_pauses p
                          where p.since >= now() - make_interval(hours => p_window_hours)),
    'jobs_released_by_outages', (select coalesce(sum(p.jobs_released), 0) from public.sona_pauses p
                                  where p.since >= now() - make_interval(hours => p_window_hours)),
    'cancelled', (select count(*) from public.jobs j
                   where j.cancelled_at >= now() - make_interval(hours => p_window_hours)),
    'quota', jsonb_build_object(
      'max_active_jobs', public.sona_setting('max_active_jobs'),
      'max_jobs_per_day', public.sona_setting('max_jobs_per_day'),
      -- counted since the migration (a refused insert leaves no row to count)
      'refused_active_total', (select case when s.is_called then s.last_value else 0 end
                                 from public.sona_refused_active_seq s),
      'refused_daily_total', (select case when s.is_called then s.last_value else 0 end
                                from public.sona_refused_daily_seq s))
  )
$$;
revoke all on function public.spend_stats(integer) from public, anon, authenticated;
grant execute on function public.spend_stats(integer) to service_role;

-- Paid generations per model in the window, for `stats` to price (the credits are a setting):
-- a completed job's audio names its model; every forgotten id was one more paid generation.
create or replace function public.generation_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker set search_path = '' as $$
  select coalesce(jsonb_object_agg(m.model, jsonb_build_object('completed', m.completed, 'lost', m.lost)),
                  '{}'::jsonb)
    from (select coalesce(j.audio ->> 'model', j.generation_model) as model,
                 count(*) filter (where j.status = 'completed') as completed,
                 coalesce(sum(j.generations_lost), 0) as lost
            from public.jobs j
           where j.created_at >= now() - make_interval(hours => p_window_hours)
             and (j.status = 'completed' or j.generations_lost > 0)
             and coalesce(j.audio ->> 'model', j.generation_model) is not null
           group by 1) m
$$;
revoke all on function public.generation_stats(integer) from public, anon, authenticated;
grant execute on function public.generation_stats(integer) to service_role;

-- tokens ------------------------------------------------------------------------------------------
-- (supabase/schemas/50_tokens.sql)

-- A job that gives the musician nothing gives their tokens back.
--
-- The real plug-in charges before the job exists: its `generate` Edge Function calls use_tokens (a
-- 'usage' row in token_transactions, the balance in user_tokens lowered) and then inserts the job
-- with the service role. Nothing of the charge is written on the job. So:
--
-- 1. The charge belongs to its job (public.sona_job_charges, one row per job inserted while the
--    plug-in's token tables exist). At insert, under the user's lock, the job takes the same user's
--    newest 'usage' transaction not yet taken by another job whose description is exactly what
--    generate writes for this row (tier, duration, quality as sent, the prompt's first 30
--    characters) and which was written at most sona_charge_window() before the job. Two jobs of
--    different prices have different descriptions, so they cannot swap charges; two identical
--    requests cost the same, so which of the two charges each takes does not matter. A job whose
--    charge is not found keeps a row with no transaction: it is refunded nothing, logged and counted
--    (sona token_stats), never guessed.
-- 2. Settlement, once, in the transaction of the job's final write: failed (whatever the cause) or
--    cancelled before its attempt reached the `generating` stage -> one 'refund' transaction naming
--    the job and the balance raised by what was charged; completed, or cancelled once generation had
--    begun -> the tokens are kept (a user marking their own job failed counts as a cancel). A row
--    lock on the charge makes concurrent finishes settle once.
-- 3. Quotas on the service-role path (generate's): a charged job over the user's quota is not
--    refused (its tokens are already spent) but inserted `failed` with the quota's message, and
--    refunded at once. Service-role inserts with no charge (the worker, an operator) stay exempt.
-- 4. token_stats(): tokens charged and refunded, and jobs whose charge was not found, in a window.
-- On a database without the plug-in's token tables the triggers return at once: nothing changes.

create table if not exists public.sona_job_charges (
  -- deferred: the link is written by the BEFORE INSERT trigger, before its job row exists
  job_id uuid primary key references public.jobs (id) on delete cascade deferrable initially deferred,
  user_id uuid not null,
  -- null: no charge was found for this job (it will be refunded nothing)
  transaction_id uuid unique,
  tokens integer check (tokens > 0),
  -- what generate would have written for this job: the charge looked for
  description text,
  linked_at timestamptz not null default now(),
  settled_at timestamptz,
  settlement text check (settlement in ('refunded', 'kept', 'refund_failed')),
  refund_transaction_id uuid unique,
  note text,
  check ((transaction_id is null) = (tokens is null)),
  check ((settled_at is null) = (settlement is null))
);
create index if not exists sona_job_charges_linked_at_idx on public.sona_job_charges (linked_at);
create index if not exists sona_job_charges_settled_at_idx on public.sona_job_charges (settled_at)
  where settled_at is not null;
alter table public.sona_job_charges enable row level security;
revoke all on public.sona_job_charges from public, anon, authenticated;
grant all on public.sona_job_charges to service_role;

-- How long before its job a charge may have been written (generate charges, then inserts, in one
-- request: seconds apart; a longer gap is another request's charge).
create or replace function public.sona_charge_window() returns interval
language sql immutable set search_path = '' as $$ select interval '5 minutes' $$;

-- generate's wording of a charge (supabase/functions/generate/index.ts): `Tier (duration, quality):
-- "prompt"`, the duration as Ns, Mm or Mm Ss, the prompt cut to 30 characters plus '...'. Null for
-- a mode generate does not price. (JavaScript counts UTF-16 units where this counts characters: a
-- prompt with characters outside the Basic Multilingual Plane in its first 30 may not match.)
create or replace function public.sona_charge_description(
  p_mode text, p_duration integer, p_quality text, p_prompt text)
returns text
language sql immutable set search_path = '' as $$
  select case when p_mode in ('designer', 'producer', 'creator') then
    format('%s (%s, %s): "%s"',
           upper(left(p_mode, 1)) || substr(p_mode, 2),
           case when p_duration < 60 then p_duration || 's'
                when p_duration % 60 = 0 then (p_duration / 60) || 'm'
                else (p_duration / 60) || 'm ' || (p_duration % 60) || 's' end,
           p_quality,
           case when char_length(p_prompt) > 30 then left(p_prompt, 30) || '...' else p_prompt end)
  end
$$;

-- Are the plug-in's token tables here? (Looked up each time: they may arrive after this schema.)
create or replace function public.sona_tokens_present() returns boolean
language sql stable set search_path = '' as $$
  select to_regclass('public.token_transactions') is not null and to_regclass('public.user_tokens') is not null
$$;

-- The charge generate made for this job: the user's newest usage transaction with the job's
-- description, in the window before the job, that no other job has taken. Caller holds the user's
-- lock. Dynamic SQL: the token tables need not exist when this function is created.
create or replace function public.sona_find_charge(
  p_user_id uuid, p_description text, p_created_at timestamptz)
returns table (transaction_id uuid, tokens integer)
language plpgsql stable security definer set search_path = '' as $$
begin
  if p_description is null then
    return;
  end if;
  return query execute
    'select t.id, -t.amount
       from public.token_transactions t
      where t.user_id = $1 and t.type = ''usage'' and t.amount < 0 and t.description = $2
        and t.created_at <= $3 and t.created_at >= $3 - public.sona_charge_window()
        and not exists (select from public.sona_job_charges c where c.transaction_id = t.id)
      order by t.created_at desc, t.id
      limit 1'
    using p_user_id, p_description, p_created_at;
end $$;
revoke all on function public.sona_find_charge(uuid, text, timestamptz) from public, anon, authenticated;
grant execute on function public.sona_find_charge(uuid, text, timestamptz) to service_role;

-- Write the link (found or not) and log a job whose charge is missing. Answers the tokens linked.
create or replace function public.sona_link_charge(
  p_job_id uuid, p_user_id uuid, p_mode text, p_duration integer, p_quality text, p_prompt text,
  p_created_at timestamptz)
returns integer
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_description text := public.sona_charge_description(p_mode, p_duration, p_quality, p_prompt);
  v_charge record;
begin
  select * into v_charge from public.sona_find_charge(p_user_id, v_description, p_created_at);
  insert into public.sona_job_charges (job_id, user_id, transaction_id, tokens, description)
  values (p_job_id, p_user_id, v_charge.transaction_id, v_charge.tokens, v_description)
  on conflict (job_id) do nothing;
  if v_charge.transaction_id is null then
    raise log 'sona: no token charge found for job % (user %, looked for %)', p_job_id, p_user_id,
      coalesce(v_description, 'a priced mode');
  end if;
  return v_charge.tokens;
end $$;
revoke all on function public.sona_link_charge(uuid, uuid, text, integer, text, text, timestamptz) from public, anon, authenticated;
grant execute on function public.sona_link_charge(uuid, uuid, text, integer, text, text, timestamptz) to service_role;

-- Settle the job's charge once: refund it, or keep it. The row lock on the link serialises
-- concurrent finishes; the second finds it settled and does nothing. An error while refunding never
-- undoes the job's own write: the charge is marked refund_failed (counted by token_stats) instead.
create or replace function public.sona_settle_charge(p_job_id uuid, p_refund boolean, p_reason text)
returns void
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_link public.sona_job_charges;
  v_refund_id uuid;
begin
  select * into v_link from public.sona_job_charges c
   where c.job_id = p_job_id and c.settled_at is null
   for update;
  if not found then
    return;  -- no link (inserted before this migration), or settled already
  end if;
  if v_link.transaction_id is null then
    update public.sona_job_charges set settled_at = now(), settlement = 'kept', note = 'no charge found'
     where job_id = p_job_id;
    if p_refund then
      raise log 'sona: job % ended without audio but its charge was never found: nothing refunded', p_job_id;
    end if;
    return;
  end if;
  if not p_refund then
    update public.sona_job_charges set settled_at = now(), settlement = 'kept', note = p_reason
     where job_id = p_job_id;
    return;
  end if;
  begin
    execute 'insert into public.token_transactions (user_id, amount, type, description)
             values ($1, $2, ''refund'', $3) returning id'
      into v_refund_id
      using v_link.user_id, v_link.tokens,
            format('Refund for job %s (%s): %s', p_job_id, p_reason, v_link.description);
    execute 'insert into public.user_tokens as u (user_id, balance) values ($1, $2)
             on conflict (user_id) do update
               set balance = u.balance + excluded.balance,
                   lifetime_used = greatest(0, u.lifetime_used - excluded.balance),
                   updated_at = now()'
      using v_link.user_id, v_link.tokens;
    update public.sona_job_charges
       set settled_at = now(), settlement = 'refunded', refund_transaction_id = v_refund_id, note = p_reason
     where job_id = p_job_id;
  exception when others then
    update public.sona_job_charges
       set settled_at = now(), settlement = 'refund_failed', note = sqlstate || ': ' || sqlerrm
     where job_id = p_job_id;
    raise warning 'sona: refund of job % failed: % %', p_job_id, sqlstate, sqlerrm;
  end;
end $$;
revoke all on function public.sona_settle_charge(uuid, boolean, text) from public, anon, authenticated;
grant execute on function public.sona_settle_charge(uuid, boolean, text) to service_role;

-- Was anything generated (paid for) before the cancel? The stage the attempt had reached says so;
-- without a stage column, only a job that never started counts as untouched.
create or replace function public.sona_generation_began(p_old jsonb) returns boolean
language sql immutable set search_path = '' as $$
  select case when p_old ? 'stage' then coalesce(p_old ->> 'stage', '') in ('generating', 'encoding', 'uploading', 'done')
              else coalesce(p_old ->> 'status', '') not in ('pending', 'queued') end
$$;

-- The job's final write settles its charge.
create or replace function public.jobs_settle_charge() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
begin
  if not public.sona_tokens_present() then
    return null;
  end if;
  -- A user's own write of 'failed' (the plug-in's "Users can update own jobs" policy allows it) is
  -- a cancel in all but name: it refunds only what was not yet paid for.
  if new.status = 'failed' and coalesce(current_setting('role', true), '') not in ('anon', 'authenticated') then
    perform public.sona_settle_charge(new.id, true, 'failed');
  elsif new.status in ('cancelled', 'failed') then
    if public.sona_generation_began(to_jsonb(old)) then
      perform public.sona_settle_charge(new.id, false, 'cancelled after generation began');
    else
      perform public.sona_settle_charge(new.id, true, 'cancelled before generation');
    end if;
  elsif new.status = 'completed' then
    perform public.sona_settle_charge(new.id, false, 'completed');
  end if;
  return null;
end $$;
revoke all on function public.jobs_settle_charge() from public, anon, authenticated;
grant execute on function public.jobs_settle_charge() to service_role;
create or replace trigger jobs_settle_charge after update of status on public.jobs
  for each row
  when (old.status is distinct from new.status and new.status in ('failed', 'cancelled', 'completed'))
  execute function public.jobs_settle_charge();

-- At insert: link the charge; over quota on the service-role path, fail (and refund) at once. Named
-- to fire before jobs_derive_stage (triggers fire in name order), so the stage follows a status this
-- trigger sets. Takes the user's quota lock (the one sona_enforce_quota takes), so one user's
-- inserts link their charges, and count their quotas, one at a time.
create or replace function public.jobs_charge_link() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_tokens integer;
  v_caller text := coalesce(nullif(current_setting('role', true), ''), 'none');
  v_active integer;
  v_day integer;
  v_message text;
begin
  if not public.sona_tokens_present() then
    return new;
  end if;
  perform pg_advisory_xact_lock(hashtextextended('sona.quota:' || new.user_id::text, 0));
  v_tokens := public.sona_link_charge(new.id, new.user_id, new.mode, new.duration, new.quality, new.prompt,
                                      new.created_at);
  -- Users' own inserts meet sona_enforce_quota (refused before anything is charged); a charged
  -- insert from the service role must not be refused, so over quota it is failed instead.
  if v_tokens is not null and v_caller not in ('anon', 'authenticated')
     and new.status in ('pending', 'queued')
     and to_regprocedure('public.sona_setting(text)') is not null then
    select count(*) filter (where j.status in ('pending', 'queued', 'processing')),
           count(*) filter (where j.created_at > now() - interval '24 hours')
      into v_active, v_day
      from public.jobs j where j.user_id = new.user_id;
    if v_active >= public.sona_setting('max_active_jobs') then
      perform nextval('public.sona_refused_active_seq');
      v_message := format('You have %s %s running; wait for one to finish. Your tokens were refunded.',
                          v_active, case when v_active = 1 then 'job' else 'jobs' end);
    elsif v_day >= public.sona_setting('max_jobs_per_day') then
      perform nextval('public.sona_refused_daily_seq');
      v_message := format('You have started %s jobs in the last 24 hours, the most allowed; try again'
                          ' later. Your tokens were refunded.', v_day);
    end if;
    if v_message is not null then
      new.status := 'failed';
      new.error_message := v_message;
      new.completed_at := now();
    end if;
  end if;
  -- A row that arrives already finished is settled now, as its final write.
  if new.status in ('failed', 'cancelled') then
    perform public.sona_settle_charge(new.id, true, coalesce(v_message, new.status));
  elsif new.status = 'completed' then
    perform public.sona_settle_charge(new.id, false, 'completed');
  end if;
  return new;
end $$;
revoke all on function public.jobs_charge_link() from public, anon, authenticated;
grant execute on function public.jobs_charge_link() to service_role;
create or replace trigger jobs_charge_link before insert on public.jobs
  for each row execute function public.jobs_charge_link();

-- Tokens charged by the jobs created in the window, tokens refunded in the window, and the jobs of
-- the window whose charge was not found (refunded nothing) or whose refund failed.
create or replace function public.token_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker set search_path = '' as $$
  with since as (
    select now() - make_interval(hours => p_window_hours) as t
  )
  select jsonb_build_object(
    'tokens_present', public.sona_tokens_present(),
    'jobs_charged', count(*) filter (where c.linked_at >= s.t and c.transaction_id is not null),
    'tokens_charged', coalesce(sum(c.tokens) filter (where c.linked_at >= s.t), 0),
    'refunds', count(*) filter (where c.settled_at >= s.t and c.settlement = 'refunded'),
    'tokens_refunded', coalesce(sum(c.tokens) filter (where c.settled_at >= s.t and c.settlement = 'refunded'), 0),
    'charge_not_found', count(*) filter (where c.linked_at >= s.t and c.transaction_id is null),
    'refund_failed', count(*) filter (where c.settled_at >= s.t and c.settlement = 'refund_failed'))
  from public.sona_job_charges c, since s
$$;
revoke all on function public.token_stats(integer) from public, anon, authenticated;
grant execute on function public.token_stats(integer) to service_role;

-- storage -----------------------------------------------------------------------------------------
-- (supabase/schemas/60_storage.sql)

-- Files: what the output bucket keeps, what is deleted and when, and the inputs bucket.
--
-- Retention: complete_job keeps each user's newest keep_outputs_per_user outputs and clears the
-- older ones' paths; the plug-in's daily cleanup clears paths older than 24 h. Whenever a row's
-- paths are cleared (or the row is deleted), its WAV, MP3 and peaks file are queued here and the
-- next reclaim_jobs deletes them (deleting a name already gone is a no-op, so the plug-in's cleanup
-- having done it is fine); the row's URLs are cleared in the same statement.

create table if not exists public.sona_storage_garbage (
  id bigint generated always as identity primary key,
  name text not null unique,
  queued_at timestamptz not null default now()
);
alter table public.sona_storage_garbage enable row level security;
revoke all on public.sona_storage_garbage from public, anon, authenticated;
grant all on public.sona_storage_garbage to service_role;

-- The peaks file sits beside the MP3 preview (same stamp, .json), so it goes with it.
create or replace function public.sona_output_names(p_master text, p_preview text)
returns text[] language sql immutable set search_path = '' as $$
  select array_remove(array[p_master, p_preview,
    case when p_preview like '%.mp3' then left(p_preview, -4) || '.json' end], null)
$$;

-- The files of a row whose paths were cleared or changed, or which was deleted.
create or replace function public.jobs_queue_expired_files() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  v_kept text[] := case when tg_op = 'UPDATE' then array[new.master_path, new.preview_path] else '{}' end;
begin
  insert into public.sona_storage_garbage (name)
  select n from unnest(public.sona_output_names(old.master_path, old.preview_path)) n
   where n <> all (array_remove(v_kept, null))
  on conflict (name) do nothing;
  return null;
end $$;
revoke all on function public.jobs_queue_expired_files() from public, anon, authenticated;
grant execute on function public.jobs_queue_expired_files() to service_role;
create or replace trigger jobs_queue_expired_files after update of master_path, preview_path or delete on public.jobs
  for each row when (old.master_path is not null or old.preview_path is not null)
  execute function public.jobs_queue_expired_files();

-- A row whose files are gone keeps no URL to them (nor to its peaks).
create or replace function public.jobs_forget_expired_urls() returns trigger
language plpgsql set search_path = '' as $$
begin
  if new.master_path is null and new.preview_path is null then
    new.wav_url := null;
    new.mp3_url := null;
    new.result_url := null;
    new.audio := new.audio - 'peaks_url';
  end if;
  return new;
end $$;
-- Named to run before jobs_derive_stage (alphabetical), which copies audio's peaks_url to its column.
create or replace trigger jobs_clear_expired_urls before update of master_path, preview_path on public.jobs
  for each row when (old.master_path is not null or old.preview_path is not null)
  execute function public.jobs_forget_expired_urls();

-- reclaim_jobs reads what is due and says what it deleted.
create or replace function public.sona_storage_garbage_due(p_limit integer)
returns setof public.sona_storage_garbage
language sql stable security invoker set search_path = '' as $$
  select * from public.sona_storage_garbage g order by g.id limit p_limit
$$;
revoke all on function public.sona_storage_garbage_due(integer) from public, anon, authenticated;
grant execute on function public.sona_storage_garbage_due(integer) to service_role;

create or replace function public.sona_storage_garbage_done(p_ids bigint[])
returns integer
language sql volatile security invoker set search_path = '' as $$
  with gone as (delete from public.sona_storage_garbage g where g.id = any (p_ids) returning 1)
  select count(*)::integer from gone
$$;
revoke all on function public.sona_storage_garbage_done(bigint[]) from public, anon, authenticated;
grant execute on function public.sona_storage_garbage_done(bigint[]) to service_role;

-- Audio-to-audio's inputs: the musician uploads the source audio to this private bucket, under a
-- folder named by their user id ('{user_id}/take.wav'), and names it in input_path. Audio only,
-- within the provider's 50 MB request.
insert into storage.buckets (id, name, public, file_size_limit, allowed_mime_types)
values ('audio-inputs', 'audio-inputs', false, 50000000,
        array['audio/wav', 'audio/x-wav', 'audio/wave', 'audio/vnd.wave', 'audio/mpeg', 'audio/mp3'])
on conflict (id) do update
  set public = false,
      file_size_limit = excluded.file_size_limit,
      allowed_mime_types = excluded.allowed_mime_types;

-- A signed-in user may upload, read, replace and delete only inside their own folder of the inputs
-- bucket (Supabase's own policy shape). The function reads with the service role (bypasses RLS).
drop policy if exists sona_inputs_select_own on storage.objects;
create policy sona_inputs_select_own on storage.objects for select to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
drop policy if exists sona_inputs_insert_own on storage.objects;
create policy sona_inputs_insert_own on storage.objects for insert to authenticated
  with check (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
drop policy if exists sona_inputs_update_own on storage.objects;
create policy sona_inputs_update_own on storage.objects for update to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text))
  with check (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
drop policy if exists sona_inputs_delete_own on storage.objects;
create policy sona_inputs_delete_own on storage.objects for delete to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));

-- realtime ----------------------------------------------------------------------------------------
-- (supabase/schemas/70_realtime.sql)

-- Supabase Realtime pushes each change of a job to the plug-in: its UI subscribes to
-- postgres_changes on its job (and polls every 2 s besides). Realtime sends only what is in the
-- supabase_realtime publication, which a Supabase project has (empty until tables are added) and a
-- plain PostgreSQL has not: jobs joins it where it exists. What a subscriber then receives is
-- decided by its role's row level security and column privileges (README, "Realtime").
do $$ begin
  if exists (select from pg_publication where pubname = 'supabase_realtime')
     and not exists (select from pg_publication_tables
                      where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = 'jobs') then
    alter publication supabase_realtime add table public.jobs;
  end if;
end $$;

-- rows from before this migration ---------------------------------------------------------------

-- The earlier worker's table had a nullable created_at: such a row would never be dispatched by
-- reclaim_jobs (its grace check compares created_at) nor counted by job_stats. Rows also take the
-- stage and peaks_url their status and audio imply. updated_at stays as it was (sona_backfill_jobs).
do $$ begin
  if exists (select from public.jobs where created_at is null) then
    perform public.sona_backfill_jobs(
      'update public.jobs set created_at = coalesce(updated_at, now()) where created_at is null');
  end if;
end $$;
-- A scan of a table of thousands of rows, once; a no-op where it holds already.
alter table public.jobs alter column created_at set default now();
-- squawk-ignore adding-not-nullable-field
alter table public.jobs alter column created_at set not null;

select public.sona_backfill_jobs($sql$
  update public.jobs j
     set stage = coalesce(public.sona_stage_of(j.status), j.stage)
   where j.stage is distinct from coalesce(public.sona_stage_of(j.status), j.stage)
      or j.peaks_url is distinct from j.audio ->> 'peaks_url'
$sql$);

-- Jobs still live (the plug-in's queued and processing ones) take their charges too, oldest first,
-- so that they are refunded if they fail from now on. Finished jobs are history and stay as they are.
do $$
declare
  j record;
begin
  if not public.sona_tokens_present() then
    return;
  end if;
  for j in
    select * from public.jobs
     where status in ('pending', 'queued', 'processing')
       and not exists (select from public.sona_job_charges c where c.job_id = jobs.id)
     order by created_at, id
  loop
    perform public.sona_link_charge(j.id, j.user_id, j.mode, j.duration, j.quality, j.prompt, j.created_at);
  end loop;
end $$;
