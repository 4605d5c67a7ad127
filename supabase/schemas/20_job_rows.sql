-- What every write of a job row goes through, whoever writes it: updated_at, the plug-in's quality
-- names, the status a waiting job shows, who may write what (jobs_guard), the stage, and the quotas
-- at insert. BEFORE triggers of one event fire in name order. A row trigger's WHEN clause skips the
-- call when its function would change nothing for this write (a plpgsql call per row, with its
-- search_path set and restored, cost a reclaim of 10,000 leases about a quarter of its time: issue
-- 34); the functions still check everything themselves.

-- updated_at is kept by the database, whoever writes.
create or replace function public.jobs_set_updated_at() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end $$;
-- Where the table already has an updated_at trigger of its own (the plug-in's and the earlier
-- worker's update_jobs_updated_at), the migration leaves this one out: one is enough. A write that
-- sets updated_at to now() itself has nothing left for it to do.
create trigger jobs_set_updated_at before update on public.jobs
  for each row when (new.updated_at is distinct from now())
  execute function public.jobs_set_updated_at();

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
create trigger jobs_normalize_quality before insert or update of quality on public.jobs
  for each row execute function public.jobs_normalize_quality();

-- The status a waiting job shows is the one it was inserted with: a released or paused job goes
-- back to it ('queued' for the plug-in, whose UI knows no 'pending').
create or replace function public.jobs_remember_wait_status() returns trigger
language plpgsql set search_path = '' as $$
begin
  new.wait_status := case when new.status in ('pending', 'queued') then new.status end;
  return new;
end $$;
create trigger jobs_remember_wait_status before insert on public.jobs
  for each row execute function public.jobs_remember_wait_status();

-- Rows inserted before wait_status existed have none: a plug-in mode waits as 'queued' (that is how
-- the plug-in inserts), anything else as 'pending'.
create or replace function public.sona_wait_status(p_wait_status text, p_mode text)
returns text language sql immutable as $$
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
-- It acts only for a user, or on a write to 'processing' that sets no new lease; the insert's
-- trigger is its own (an insert has no old row to name). Named so both fire where jobs_guard did.
create trigger jobs_guard before update on public.jobs
  for each row
  when (current_user in ('anon', 'authenticated')
        or (old.status in ('pending', 'queued') and new.status = 'processing'
            and new.lease_token is not distinct from old.lease_token))
  execute function public.jobs_guard();
create trigger jobs_guard_insert before insert on public.jobs
  for each row when (current_user in ('anon', 'authenticated'))
  execute function public.jobs_guard();

-- Who is asking: a user (or anon) when either the role the request set or the role running the
-- statement says so. A SECURITY DEFINER function runs as its owner, but the request's role stays in
-- the `role` setting (PostgREST runs `set local role`), so a definer function called by anon still
-- counts as anon here.
create or replace function public.sona_caller_is_user() returns boolean
language sql stable set search_path = '' as $$
  select current_user in ('anon', 'authenticated')
      or coalesce(nullif(current_setting('role', true), ''), 'none') in ('anon', 'authenticated')
$$;

-- A user's own insert (issue 29): where the plug-in's token tables exist it is refused (SQ004), since
-- jobs come from `generate`, which charges first and inserts with the service role; a prompt outside
-- generate's 5 to 800 characters is refused first, with its own message. Scheduling and bookkeeping
-- columns are the server's everywhere. Fires after jobs_guard and jobs_derive_stage (name order).
create or replace function public.jobs_guard_user_insert() returns trigger
language plpgsql set search_path = '' as $$
declare
  v_prompt integer := char_length(new.prompt);
begin
  if current_user not in ('anon', 'authenticated') then
    return new;
  end if;
  if public.sona_tokens_present() and (v_prompt < 5 or v_prompt > 800) then
    raise exception using errcode = '23514',
      message = format('A prompt is 5 to 800 characters long; this one has %s.', v_prompt),
      hint = 'sona_prompt_length';
  end if;
  if new.created_at is distinct from now() or new.updated_at is distinct from now()
     or num_nonnulls(new.run_after, new.dispatched_at, new.waiting_since) > 0
     or new.dispatches <> 0 or new.reuse_only or new.stage <> 'queued' then
    raise exception using errcode = '42501',
      message = 'When a job was made and when it runs are set by the server, not by the request.',
      hint = 'sona_schedule_protected';
  end if;
  if public.sona_tokens_present() then
    raise exception using errcode = 'SQ004',
      message = 'Jobs are started through Sona''s generate function, which charges their tokens; '
                'a job inserted directly is never generated.',
      hint = 'sona_unpaid_insert';
  end if;
  return new;
end $$;
create trigger jobs_guard_user_insert before insert on public.jobs
  for each row execute function public.jobs_guard_user_insert();

-- What a user may change on their own row (the plug-in's "Users can update own jobs" policy lets
-- them write any column): only whether it is shared. updated_at is the trigger's. Everything else
-- (what the job asks for, created_at, run_after, stage, results) is the service functions'.
create or replace function public.sona_user_writable_columns() returns text[]
language sql immutable set search_path = '' as $$ select array['public', 'updated_at'] $$;

create or replace function public.jobs_guard_request() returns trigger
language plpgsql set search_path = '' as $$
begin
  if current_user not in ('anon', 'authenticated') then
    return new;
  end if;
  if to_jsonb(new) - public.sona_user_writable_columns()
     is distinct from to_jsonb(old) - public.sona_user_writable_columns() then
    raise exception using errcode = '42501',
      message = 'A job''s request, schedule and progress are fixed once it is made; only whether it '
                'is public can change.',
      hint = 'sona_request_frozen';
  end if;
  return new;
end $$;
create trigger jobs_guard_request before update on public.jobs
  for each row when (current_user in ('anon', 'authenticated'))
  execute function public.jobs_guard_request();

-- The stage: queued -> claimed -> generating -> encoding -> uploading -> done (or failed,
-- cancelled). A status (or a new lease, which is a new attempt) sets it; advance_stage() writes the
-- three stages inside an attempt. Each is its own committed UPDATE, so Realtime pushes each.
-- peaks_url is copied from the audio info complete_job writes (not a generated column: logical
-- replication, which feeds Realtime, publishes generated columns only from PostgreSQL 18).

-- The order of the stages an attempt moves through; null for the others.
create or replace function public.sona_stage_rank(p_stage text)
returns integer language sql immutable as $$
  select case p_stage when 'claimed' then 1 when 'generating' then 2
                      when 'encoding' then 3 when 'uploading' then 4 end
$$;

-- The stage a status implies (processing starts at claimed).
create or replace function public.sona_stage_of(p_status text)
returns text language sql immutable as $$
  select case p_status when 'pending' then 'queued' when 'queued' then 'queued'
                       when 'processing' then 'claimed' when 'completed' then 'done'
                       when 'failed' then 'failed' when 'cancelled' then 'cancelled' end
$$;

-- The stage an update leaves: a new status or lease, or any status but processing, sets the one the
-- status implies; within an attempt a stage outside the attempt's keeps the old one. Also the update
-- trigger's WHEN clause, so it is defined once.
create or replace function public.sona_derived_stage(
  p_status text, p_old_status text, p_lease_token uuid, p_old_lease_token uuid,
  p_stage text, p_old_stage text)
returns text language sql immutable as $$
  select case when p_status is distinct from p_old_status
                   or p_lease_token is distinct from p_old_lease_token
                   or p_status <> 'processing'
              then coalesce(public.sona_stage_of(p_status), p_stage)
              when public.sona_stage_rank(p_stage) is null then p_old_stage
              else p_stage end
$$;

create or replace function public.jobs_derive_stage() returns trigger
language plpgsql set search_path = '' as $$
begin
  if tg_op = 'INSERT' then
    new.stage := coalesce(public.sona_stage_of(new.status), new.stage);
  else
    new.stage := public.sona_derived_stage(new.status, old.status, new.lease_token, old.lease_token,
                                           new.stage, old.stage);
  end if;
  new.peaks_url := new.audio ->> 'peaks_url';
  return new;
end $$;
-- An update that already has the stage it implies and the peaks URL its audio names skips it.
create trigger jobs_derive_stage before update on public.jobs
  for each row
  when (new.stage is distinct from public.sona_derived_stage(new.status, old.status, new.lease_token,
                                                             old.lease_token, new.stage, old.stage)
        or new.peaks_url is distinct from new.audio ->> 'peaks_url')
  execute function public.jobs_derive_stage();
create trigger jobs_derive_stage_insert before insert on public.jobs
  for each row execute function public.jobs_derive_stage();

-- Quotas at insert for users (anon, authenticated); the service role and the database owner are
-- exempt (a charged insert from generate over quota is failed and refunded instead:
-- jobs_charge_link, 50_tokens.sql). A refused insert rolls back, and anything it wrote with it; a
-- sequence's nextval does not, so the refusals are counted there.
create sequence public.sona_refused_active_seq;
create sequence public.sona_refused_daily_seq;
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
create trigger sona_enforce_quota before insert on public.jobs
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
-- Skipped when it would change nothing (reclaim_and_dispatch sets the class of the attempts it ends).
create trigger job_attempts_outcome_class before insert or update on public.job_attempts
  for each row
  when ((new.outcome = 'lease_expired' and new.outcome_class is null)
        or (new.outcome is null and (new.outcome_class is not null or new.timings_ms is not null)))
  execute function public.job_attempts_outcome_class();
