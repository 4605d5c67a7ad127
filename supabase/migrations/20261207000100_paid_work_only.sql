-- Sona: a job is generated only when it was paid for (issue 29). Idempotent; valid on PostgreSQL 15
-- and newer. Tried as the plug-in's users would (its own-row insert and update policies, its
-- publishable key, anon), each hole below was reached; this closes them.
--
-- 1. Only paid work is generated. Where the plug-in's token tables exist, a signed-in user's (or
--    anon's) own insert into jobs is refused (SQ004): jobs come from `generate`, which charges first
--    and inserts with the service role. A charge is linked only to a service-role insert, on the
--    server's clock (now(), never the row's created_at), within sona_charge_window() of it: a
--    charge from before that window is never linkable. Without the token tables (the earlier
--    worker's clients) users still insert, and their quotas count by the server's time: created_at
--    is the server's at insert and never changes after.
-- 2. The request is frozen once inserted. A user may change only `public` on their own row (and
--    updated_at, which a trigger keeps); everything else (what the job asks for, created_at,
--    run_after, stage, results) is written by the service functions alone. A user's insert may not
--    set scheduling or bookkeeping columns.
-- 3. A refund follows the worker's own record (job_attempts, which no user reaches): advance_stage
--    stamps when an attempt called the provider and when a call came back paid (audio in hand, or a
--    generation id). Cancelled: refunded only if no attempt called the provider. Failed: refunded
--    only if no paid call is on record. Once, as before (a row lock on the charge).
-- 4. Deletion only by a trusted hand, and late: a path cleared by anon or a user queues nothing; a
--    cleared path's files wait storage_delete_delay_seconds (a day) and a path restored in that time
--    keeps them. EXECUTE on the plug-in's cleanup_expired_audio_paths is closed to anon,
--    authenticated and PUBLIC (the service role, which its cron's Edge Function uses, keeps it). The
--    files a worker stores for a job cancelled during its generation are queued for deletion.
-- 5. Names and reads: the file name is a safe name (checked here, built safe by sona/job/naming.py); a
--    user's insert in the plug-in's world needs a prompt of 5 to 800 characters (generate's rule);
--    anon reads only the showcase's columns, no URL into the private bucket.

-- The plug-in's generate inserts into jobs while this runs: give up on a lock rather than queue
-- every insert behind a wait (the deploy is then retried), and never run on unbounded.
set lock_timeout = '10s';
set statement_timeout = '5min';

-- 0. who is asking ---------------------------------------------------------------------------------

-- The caller is a user (or anon) when either the role the request set or the role running the
-- statement says so: a SECURITY DEFINER function runs as its owner, but the request's role is kept
-- in the `role` setting (PostgREST runs `set local role`), so a definer function called by anon
-- still counts as anon here.
create or replace function public.sona_caller_is_user() returns boolean
language sql stable set search_path = '' as $$
  select current_user in ('anon', 'authenticated')
      or coalesce(nullif(current_setting('role', true), ''), 'none') in ('anon', 'authenticated')
$$;

-- 1 and 5. a user's insert ---------------------------------------------------------------------------

-- Fires after jobs_guard (results) and jobs_derive_stage (the stage a status implies): triggers of one
-- kind fire in name order, and a raise here undoes the whole insert.
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
drop trigger if exists jobs_guard_user_insert on public.jobs;
create trigger jobs_guard_user_insert before insert on public.jobs
  for each row execute function public.jobs_guard_user_insert();

-- The charge link: as in the baseline (50_tokens.sql), but only for a trusted insert (generate's, with the service
-- role), and looked for on the server's clock. A user's insert links nothing (it is refused above).
create or replace function public.jobs_charge_link() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_tokens integer;
  v_active integer;
  v_day integer;
  v_message text;
begin
  if not public.sona_tokens_present() or public.sona_caller_is_user() then
    return new;
  end if;
  perform pg_advisory_xact_lock(hashtextextended('sona.quota:' || new.user_id::text, 0));
  v_tokens := public.sona_link_charge(new.id, new.user_id, new.mode, new.duration, new.quality, new.prompt,
                                      now());
  if v_tokens is not null and new.status in ('pending', 'queued')
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
  if new.status in ('failed', 'cancelled') then
    perform public.sona_settle_charge(new.id, true, coalesce(v_message, new.status));
  elsif new.status = 'completed' then
    perform public.sona_settle_charge(new.id, false, 'completed');
  end if;
  return new;
end $$;

-- The plug-in's generate wrote the charge moments before its insert; the link looks back from the
-- server's clock only, so a row's own created_at (whoever set it) plays no part.
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
        and t.created_at <= now() and t.created_at >= now() - public.sona_charge_window()
        and not exists (select from public.sona_job_charges c where c.transaction_id = t.id)
      order by t.created_at desc, t.id
      limit 1'
    using p_user_id, p_description, p_created_at;
end $$;

-- 2. the request is frozen ---------------------------------------------------------------------------

-- What a user may change on their own row (the plug-in's "Users can update own jobs" policy lets them
-- write any column): only whether it is shared. updated_at is the trigger's.
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
drop trigger if exists jobs_guard_request on public.jobs;
create trigger jobs_guard_request before update on public.jobs
  for each row execute function public.jobs_guard_request();

-- 3. refunds follow the worker's record ------------------------------------------------------------

alter table public.job_attempts
  add column if not exists provider_called_at timestamptz,  -- the attempt passed the last fence
  add column if not exists provider_paid_at timestamptz;    -- a call came back paid for

-- advance_stage as in the baseline (30_state_machine.sql), and it writes the record on the attempt holding the lease:
-- 'generating' is written just before the provider is called, 'encoding' once its audio is in hand.
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
  if found then
    update public.job_attempts a
       set provider_called_at = coalesce(a.provider_called_at, now()),
           provider_paid_at = case when p_stage = 'generating' then a.provider_paid_at
                                   else coalesce(a.provider_paid_at, now()) end
     where a.job_id = p_job_id and a.lease_token = p_lease_token;
    return;
  end if;
  if exists (select from public.jobs j where j.id = p_job_id and j.status = 'cancelled') then
    raise exception 'job % was cancelled by its owner', p_job_id using errcode = 'SQ003';
  end if;
end $$;

-- record_generation as in the baseline (30_state_machine.sql): the id is the payment, so the attempt is marked paid.
create or replace function public.record_generation(
  p_job_id uuid, p_lease_token uuid, p_generation_id text, p_model text)
returns setof public.jobs
language plpgsql volatile security invoker set search_path = '' as $$
begin
  return query
  update public.jobs j
     set generation_id = p_generation_id,
         generation_model = p_model,
         generation_posted_at = coalesce(j.generation_posted_at, now())
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
     and (j.generation_id is null or j.generation_id = p_generation_id)
  returning j.*;
  if found then
    update public.job_attempts a
       set provider_called_at = coalesce(a.provider_called_at, now()),
           provider_paid_at = coalesce(a.provider_paid_at, now())
     where a.job_id = p_job_id and a.lease_token = p_lease_token;
  end if;
end $$;

-- What the worker's records say was spent on a job: 'paid' (a call came back paid, or a generation
-- id was ever held), 'called' (a call was made, its outcome unknown), or 'none'.
create or replace function public.sona_provider_spend(p_job_id uuid) returns text
language sql stable security definer set search_path = '' as $$
  select case
    when exists (select from public.job_attempts a where a.job_id = p_job_id and a.provider_paid_at is not null)
      or exists (select from public.jobs j where j.id = p_job_id
                   and (j.generation_id is not null or j.generations_lost > 0)) then 'paid'
    when exists (select from public.job_attempts a where a.job_id = p_job_id and a.provider_called_at is not null)
      then 'called'
    else 'none' end
$$;

-- The stage a row says it reached no longer decides a refund (the owner could write it); nothing
-- else called this helper.
-- squawk-ignore ban-drop-function
drop function if exists public.sona_generation_began(jsonb);

-- Settlement as in the baseline (50_tokens.sql), decided by the worker's records, never by the row's stage: a
-- cancel refunds only a job no call was made for (one in flight may be paid); a failure refunds
-- unless a paid call is on record (a refused or failed call is not charged by the provider).
create or replace function public.jobs_settle_charge() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_spend text;
begin
  if not public.sona_tokens_present() then
    return null;
  end if;
  v_spend := public.sona_provider_spend(new.id);
  if new.status = 'completed' then
    perform public.sona_settle_charge(new.id, false, 'completed');
  elsif new.status = 'cancelled' or public.sona_caller_is_user() then
    if v_spend = 'none' then
      perform public.sona_settle_charge(new.id, true, 'cancelled before generation');
    else
      perform public.sona_settle_charge(new.id, false, 'cancelled after generation began');
    end if;
  elsif v_spend = 'paid' then
    perform public.sona_settle_charge(new.id, false, 'failed after a paid generation');
  else
    perform public.sona_settle_charge(new.id, true, 'failed');
  end if;
  return null;
end $$;

-- 4. deletion: a trusted hand, and a day to undo ------------------------------------------------

-- The allowed keys widen by one: every row that met the old check meets the new one.
-- squawk-ignore ban-drop-constraint
alter table public.sona_settings drop constraint if exists sona_settings_key_check;
-- squawk-ignore constraint-missing-not-valid
alter table public.sona_settings add constraint sona_settings_key_check check (key in (
  'max_active_jobs', 'max_jobs_per_day', 'pause_seconds', 'pause_max_wait_seconds',
  'keep_outputs_per_user', 'legacy_processing_timeout_seconds', 'storage_delete_delay_seconds'));

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
      when 'storage_delete_delay_seconds' then 86400 -- time to undo a mistaken clearing
    end)
$$;

-- Files queued before this migration are due at once (the default is evaluated once, when the column
-- is added: no rewrite of the table).
alter table public.sona_storage_garbage add column if not exists due_at timestamptz not null default now();

-- As in the baseline (60_storage.sql), but only a trusted hand's clearing queues a file, and not before the delay.
-- A clearing by anon or a user (through any definer function) leaves the files where they are.
create or replace function public.jobs_queue_expired_files() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  v_kept text[] := case when tg_op = 'UPDATE' then array[new.master_path, new.preview_path] else '{}' end;
begin
  if public.sona_caller_is_user() then
    raise log 'sona: paths of job % cleared by role %; its files are kept', old.id,
      coalesce(nullif(current_setting('role', true), ''), current_user);
    return null;
  end if;
  insert into public.sona_storage_garbage (name, due_at)
  select n, now() + make_interval(secs => public.sona_setting('storage_delete_delay_seconds'))
    from unnest(public.sona_output_names(old.master_path, old.preview_path)) n
   where n <> all (array_remove(v_kept, null))
  on conflict (name) do nothing;
  return null;
end $$;

-- A path set again before its files were deleted (a mistaken clearing undone) keeps them.
create or replace function public.jobs_keep_restored_files() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  delete from public.sona_storage_garbage g
   where g.name = any (public.sona_output_names(new.master_path, new.preview_path));
  return null;
end $$;
drop trigger if exists jobs_keep_restored_files on public.jobs;
create trigger jobs_keep_restored_files after update of master_path, preview_path on public.jobs
  for each row when (new.master_path is not null or new.preview_path is not null)
  execute function public.jobs_keep_restored_files();

create or replace function public.sona_storage_garbage_due(p_limit integer)
returns setof public.sona_storage_garbage
language sql stable security invoker set search_path = '' as $$
  select * from public.sona_storage_garbage g where g.due_at <= now() order by g.id limit p_limit
$$;

-- complete as in the baseline (30_state_machine.sql); and when the row was cancelled while this attempt generated, the
-- files it stored (named after the job) are queued for deletion at once: no row points at them.
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
    if exists (select from public.jobs j where j.id = p_job_id and j.status = 'cancelled')
       and exists (select from public.job_attempts a where a.job_id = p_job_id and a.lease_token = p_lease_token) then
      insert into public.sona_storage_garbage (name, due_at)
      select n, now() from unnest(public.sona_output_names(p_master_path, p_preview_path)) n
       where strpos(n, p_job_id::text) > 0
      on conflict (name) do nothing;
    end if;
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

-- The plug-in's retention function is SECURITY DEFINER and was never revoked from PUBLIC: anyone
-- could clear every user's paths with expiration_hours 0. Its own cron calls it through the
-- cleanup-expired-audio Edge Function with the service role, which keeps it.
do $$
begin
  if to_regprocedure('public.cleanup_expired_audio_paths(integer, integer)') is not null then
    revoke all on function public.cleanup_expired_audio_paths(integer, integer) from public, anon, authenticated;
    grant execute on function public.cleanup_expired_audio_paths(integer, integer) to service_role;
  end if;
end $$;

-- 5. names and reads -------------------------------------------------------------------------------

-- A download name, never a path: no separators, no control characters, bounded. NOT VALID: rows of
-- the plug-in's old worker stay as they are; every write from now on obeys it.
do $$ begin
  alter table public.jobs add constraint jobs_filename_safe check (
    filename is null
    or (char_length(filename) between 1 and 200 and filename !~ '[/\\[:cntrl:]]' and filename !~ '^\.')
  ) not valid;
exception when duplicate_object then null;
end $$;
-- Validated where every row already obeys it (a new database, and the plug-in's rows as seen).
do $$ begin
  alter table public.jobs validate constraint jobs_filename_safe;
exception when check_violation then null;
end $$;

-- Anon reads the landing page's showcase (PLUGIN.md): these columns and no others. The URL columns
-- of a private bucket hold long-lived signed URLs (to the WAV master too), and user_email is
-- personal. Only where anon could read the table at all (the plug-in's "Anyone can view public jobs").
do $$ begin
  if has_table_privilege('anon', 'public.jobs', 'select') then
    revoke select on public.jobs from anon;
    grant select (id, prompt, enhanced_prompt, filename, mode, duration, quality, status, public,
                  public_path, created_at, completed_at, musical_key, producer_config)
      on public.jobs to anon;
  end if;
end $$;

-- Only the service role drives these; the triggers' helpers stay callable by whoever writes a row.
do $$
declare fn text;
begin
  foreach fn in array array[
    'public.advance_stage(uuid, uuid, text)',
    'public.record_generation(uuid, uuid, text, text)',
    'public.complete_job(uuid, uuid, text, text, jsonb, jsonb, text, text, text, text)',
    'public.sona_storage_garbage_due(integer)',
    'public.sona_find_charge(uuid, text, timestamptz)',
    'public.sona_provider_spend(uuid)',
    'public.jobs_settle_charge()',
    'public.jobs_charge_link()',
    'public.jobs_queue_expired_files()',
    'public.jobs_keep_restored_files()']
  loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end $$;
