-- Sona: a drop-in back end for the real client, the Sona plug-in (JaimeAlonsoGA/sona-plugin; its
-- facts are in docs/plugin-client.md). Idempotent; valid on PostgreSQL 15 and newer. On the plug-in's database it
-- changes no row's status, mode or results and drops no policy, grant or trigger of the plug-in's.
--
-- 1. The plug-in's columns where missing (a fresh database gets the plug-in's shape).
-- 2. Its insert is never refused for its mode or quality: no mode check; its UI's quality names
--    ('standard', 'draft') become the table's ('medium', 'low') before the checks run.
-- 3. A waiting job shows the status it was inserted with: 'queued' for the plug-in (its UI knows
--    queued, processing, completed, failed), 'pending' for the earlier worker's clients.
-- 4. Results stay the worker's whatever policies the plug-in has: a signed-in user cannot write a
--    job's status, URLs, paths, file name or audio figures, their own included.
-- 5. Cutover: nothing starts a job without the claim's lease, so the plug-in's old worker (it sets
--    'processing' with no lease) can no longer take one; a job it held when this was applied fails
--    after legacy_processing_timeout_seconds, never runs twice.
-- 6. complete_job writes what the player reads (master_path, preview_path, filename,
--    enhanced_prompt) and keeps each user's newest outputs (keep_outputs_per_user, 7 as the
--    plug-in's old worker did); files whose paths are cleared (by that, by the plug-in's daily
--    cleanup, or by a deleted row) are queued for deletion, peaks included, and reclaim_jobs deletes them.
-- Redefines complete_job, fail_job, pause_service and reclaim_jobs (each as before, plus the above).

-- 1. the plug-in's columns ---------------------------------------------------------------------

alter table public.jobs
  add column if not exists musical_key jsonb,       -- {"key","scale"}, or a JSON string holding it
  add column if not exists producer_config jsonb,   -- {"type","bpm","timeSignature","bars"}, likewise
  add column if not exists naming_convention jsonb, -- {"parameters": [...], "separator"}, likewise
  add column if not exists skip_naming boolean default false,
  add column if not exists user_email text,
  add column if not exists enhanced_prompt text,    -- the exact prompt sent to the provider
  add column if not exists filename text,           -- the download name, from the naming convention
  add column if not exists master_path text,        -- the WAV's object name in the output bucket
  add column if not exists preview_path text,       -- the MP3's object name (the player signs it)
  add column if not exists public boolean default false,
  add column if not exists public_path text,
  add column if not exists wait_status text;        -- what a waiting job shows: pending or queued

-- 2. no refused insert -------------------------------------------------------------------------

-- Our mode check of an earlier version of 20261129001100 (gone from it): a mode the function does
-- not know fails its job with a message instead.
alter table public.jobs drop constraint if exists jobs_mode_known;

-- Our own duration check (the one the first migration made, 1..60 before) takes the plug-in's range.
do $$ begin
  if exists (select from pg_constraint where conrelid = 'public.jobs'::regclass
              and conname = 'jobs_duration_check'
              and pg_get_constraintdef(oid) not like '%180%') then
    alter table public.jobs drop constraint jobs_duration_check;
    alter table public.jobs add constraint jobs_duration_check check (duration between 1 and 180);
  end if;
end $$;

-- generate's default quality is 'standard' and its UI says 'draft' for low; the table's check (the
-- plug-in's valid_quality, or ours) allows low, medium, high. BEFORE triggers run before checks.
create or replace function public.jobs_normalize_quality() returns trigger
language plpgsql set search_path = '' as $$
begin
  new.quality := case new.quality when 'standard' then 'medium' when 'draft' then 'low' else new.quality end;
  return new;
end $$;
drop trigger if exists jobs_normalize_quality on public.jobs;
create trigger jobs_normalize_quality before insert or update of quality on public.jobs
  for each row execute function public.jobs_normalize_quality();

-- 3. the status a waiting job shows -------------------------------------------------------------

do $$ begin
  alter table public.jobs add constraint jobs_wait_status_check check (wait_status in ('pending', 'queued'));
exception when duplicate_object then null;
end $$;

create or replace function public.jobs_remember_wait_status() returns trigger
language plpgsql set search_path = '' as $$
begin
  new.wait_status := case when new.status in ('pending', 'queued') then new.status end;
  return new;
end $$;
drop trigger if exists jobs_remember_wait_status on public.jobs;
create trigger jobs_remember_wait_status before insert on public.jobs
  for each row execute function public.jobs_remember_wait_status();

-- Rows from before this migration have none: a plug-in mode waits as 'queued' (that is how the plug-in
-- inserts), anything else as 'pending'.
create or replace function public.sona_wait_status(p_wait_status text, p_mode text)
returns text language sql immutable set search_path = '' as $$
  select coalesce(p_wait_status,
                  case when p_mode in ('designer', 'producer', 'creator') then 'queued' else 'pending' end)
$$;

-- 4 and 5. who may write what ---------------------------------------------------------------------

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
                       new.cancelled_at) > 0
       or new.attempts <> 0 then
      raise exception using errcode = '42501',
        message = 'A new job starts pending or queued with no results; the worker writes those.',
        hint = 'sona_results_protected';
    end if;
  elsif (new.user_id, new.status, new.error_message, new.result_url, new.wav_url, new.mp3_url,
         new.master_path, new.preview_path, new.filename, new.enhanced_prompt, new.audio,
         new.public_path, new.attempts, new.lease_token, new.lease_expires_at, new.run_after,
         new.started_at, new.completed_at, new.cancelled_at, new.dispatched_at, new.wait_status)
        is distinct from
        (old.user_id, old.status, old.error_message, old.result_url, old.wav_url, old.mp3_url,
         old.master_path, old.preview_path, old.filename, old.enhanced_prompt, old.audio,
         old.public_path, old.attempts, old.lease_token, old.lease_expires_at, old.run_after,
         old.started_at, old.completed_at, old.cancelled_at, old.dispatched_at, old.wait_status) then
    raise exception using errcode = '42501',
      message = 'A job''s status and results are written by the worker, not by its owner.',
      hint = 'sona_results_protected';
  end if;
  return new;
end $$;
drop trigger if exists jobs_guard on public.jobs;
create trigger jobs_guard before insert or update on public.jobs
  for each row execute function public.jobs_guard();

-- 6. settings, retention and the files to delete -------------------------------------------------

alter table public.sona_settings drop constraint if exists sona_settings_key_check;
alter table public.sona_settings add constraint sona_settings_key_check check (key in (
  'max_active_jobs', 'max_jobs_per_day', 'pause_seconds', 'pause_max_wait_seconds',
  'keep_outputs_per_user', 'legacy_processing_timeout_seconds'));

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

-- Object names in the output bucket whose rows no longer point at them. reclaim_jobs deletes them
-- (deleting a name already gone is a no-op, so the plug-in's cleanup having done it is fine).
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
drop trigger if exists jobs_queue_expired_files on public.jobs;
create trigger jobs_queue_expired_files after update of master_path, preview_path or delete on public.jobs
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
drop trigger if exists jobs_clear_expired_urls on public.jobs;
-- Named to run before jobs_derive_stage (alphabetical), which copies audio's peaks_url to its column.
create trigger jobs_clear_expired_urls before update of master_path, preview_path on public.jobs
  for each row when (old.master_path is not null or old.preview_path is not null)
  execute function public.jobs_forget_expired_urls();

create or replace function public.sona_storage_garbage_due(p_limit integer)
returns setof public.sona_storage_garbage
language sql stable security invoker set search_path = '' as $$
  select * from public.sona_storage_garbage g order by g.id limit p_limit
$$;

create or replace function public.sona_storage_garbage_done(p_ids bigint[])
returns integer
language sql volatile security invoker set search_path = '' as $$
  with gone as (delete from public.sona_storage_garbage g where g.id = any (p_ids) returning 1)
  select count(*)::integer from gone
$$;

-- complete: fenced by the lease as before (20261129001200), and writes what the player reads; then
-- the owner's outputs beyond their newest keep_outputs_per_user lose their paths (their files are
-- queued for deletion by the trigger above), as the plug-in's old worker did after each job.
drop function if exists public.complete_job(uuid, uuid, text, text, jsonb, jsonb);
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

-- fail: as in 20261129001200; a released job waits as the status it was inserted with.
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

-- pause: as in 20261129001000; the released job waits as the status it was inserted with, which is
-- answered too (released_status).
drop function if exists public.pause_service(uuid, uuid, text, text, text, integer);
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

-- reclaim: as in 20261129001000, with two changes: a released job waits as the status it was
-- inserted with; and a 'processing' row with no lease is the plug-in's old worker's (it never
-- stamps one): left alone while that worker may still finish it, failed (never run again: it may
-- have paid) once it is older than legacy_processing_timeout_seconds.
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

-- Only the service role drives the state machine and the deletions.
do $$
declare fn text;
begin
  foreach fn in array array[
    'public.complete_job(uuid, uuid, text, text, jsonb, jsonb, text, text, text, text)',
    'public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb)',
    'public.pause_service(uuid, uuid, text, text, text, integer)',
    'public.reclaim_jobs(integer, integer, integer, integer, integer)',
    'public.sona_storage_garbage_due(integer)',
    'public.sona_storage_garbage_done(bigint[])',
    'public.jobs_queue_expired_files()']
  loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end $$;
