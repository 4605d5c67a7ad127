-- Sona: protect the spend. Idempotent; valid on PostgreSQL 15 and newer.
--
-- 1. Quotas at insert for users (anon, authenticated); the service role and the database owner are
--    exempt. Limits live in public.sona_settings, which an operator edits without a migration.
-- 2. cancel_job(id): a user cancels their own pending, queued or processing job. A cancelled row
--    has no lease, so every fenced write (complete_job, fail_job, pause_service) matches nothing.
-- 3. Account-level outages pause the service: pause_service() records one open pause and releases
--    the job without using up its attempt; claim_job claims nothing while paused, then lets one
--    probe through; the probe's completion lifts the pause. Replaces claim_job and reclaim_jobs
--    (everything 20261129000310 and 20261129000600 made them do, plus the pause).
-- 4. spend_stats(): the pause, quota refusals, cancellations, for `python -m sona stats`.

-- 1. statuses and bounds ---------------------------------------------------------------------

-- The status check (whatever its name) gains 'cancelled'; job_attempts' outcome check gains
-- 'cancelled' and 'paused'.
do $$
declare con record;
begin
  for con in
    select c.conname, c.conrelid::regclass as rel from pg_constraint c
     where c.contype = 'c'
       and ((c.conrelid = 'public.jobs'::regclass
             and c.conkey = array[(select attnum from pg_attribute
                                    where attrelid = 'public.jobs'::regclass and attname = 'status')])
         or (c.conrelid = 'public.job_attempts'::regclass
             and c.conkey = array[(select attnum from pg_attribute
                                    where attrelid = 'public.job_attempts'::regclass and attname = 'outcome')]))
  loop
    execute format('alter table %s drop constraint %I', con.rel, con.conname);
  end loop;
end $$;
alter table public.jobs add constraint jobs_status_check
  check (status in ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled'));
alter table public.job_attempts add constraint job_attempts_outcome_check
  check (outcome in ('completed', 'failed', 'released', 'lease_expired', 'stale', 'cancelled', 'paused'));

-- The provider's own prompt limit (Stable Audio: 10000 characters). NOT VALID: rows written before
-- it stay as they are (the worker fails an oversized one without paying); every new row obeys it.
do $$ begin
  alter table public.jobs add constraint jobs_prompt_length check (char_length(prompt) <= 10000) not valid;
exception when duplicate_object then null;
end $$;

alter table public.jobs
  add column if not exists cancelled_at timestamptz,
  -- when an outage first sent the job back to wait; a job waiting too long fails as unavailable
  add column if not exists waiting_since timestamptz;

-- 2. settings an operator changes without a migration ------------------------------------------

create table if not exists public.sona_settings (
  key text primary key
    check (key in ('max_active_jobs', 'max_jobs_per_day', 'pause_seconds', 'pause_max_wait_seconds')),
  value integer not null check (value >= 0),
  updated_at timestamptz not null default now()
);
alter table public.sona_settings enable row level security;
drop policy if exists sona_settings_read on public.sona_settings;
-- Users may read the limits (the plug-in can show them); only the service role writes.
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
    end)
$$;

-- 3. quotas at insert -------------------------------------------------------------------------

-- A refused insert rolls back, and anything it wrote with it; a sequence's nextval does not.
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

drop trigger if exists sona_enforce_quota on public.jobs;
create trigger sona_enforce_quota before insert on public.jobs
  for each row execute function public.sona_enforce_quota();

-- 4. cancellation -----------------------------------------------------------------------------

-- One call: the owner's (or the service role's) live job becomes 'cancelled' and loses its lease.
-- Answers the cancelled row, or nothing: not the caller's job, unknown, or already finished.
-- Security definer because users have no UPDATE on jobs; it checks the owner itself.
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

-- The worker asks this just before paying: is this lease still the job's? (false once cancelled)
create or replace function public.lease_is_held(p_job_id uuid, p_lease_token uuid)
returns boolean
language sql stable security invoker set search_path = '' as $$
  select exists (select from public.jobs j
                  where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token)
$$;

-- 5. the pause --------------------------------------------------------------------------------

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
create unique index if not exists sona_pauses_one_open on public.sona_pauses (open_slot)
  where lifted_at is null;
alter table public.sona_pauses enable row level security;
revoke all on public.sona_pauses from public, anon, authenticated;
grant all on public.sona_pauses to service_role;

-- Record the outage (once) and release the job for after the pause without using up its attempt.
-- A pause whose end has passed (its probe met the outage again) is re-armed. The release is fenced
-- like fail_job; the pause is recorded even for a stale lease (the account is at fault either way).
-- (20261202000100 adds a column to its answer: a second application of this file starts afresh.)
drop function if exists public.pause_service(uuid, uuid, text, text, text, integer);
create or replace function public.pause_service(
  p_job_id uuid, p_lease_token uuid, p_code text, p_reason text, p_message text, p_seconds integer)
returns table (pause_id bigint, pause_created boolean, paused_until timestamptz, released boolean)
language plpgsql volatile security invoker set search_path = '' as $$
#variable_conflict use_column
declare
  v_until timestamptz := now() + make_interval(secs => coalesce(p_seconds, public.sona_setting('pause_seconds')));
  v_id bigint;
  v_created boolean := false;
  v_released boolean;
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
       set status = 'pending',
           attempts = greatest(j.attempts - 1, 0),
           run_after = v_until,
           waiting_since = coalesce(j.waiting_since, now()),
           error_message = p_message,
           dispatched_at = null,
           lease_token = null,
           lease_expires_at = null
     where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
    returning j.id
  ), attempt as (
    update public.job_attempts a
       set finished_at = now(), outcome = 'paused', error = p_code || ': ' || p_reason
      from released r
     where a.job_id = r.id and a.lease_token = p_lease_token
  )
  select count(*) > 0 into v_released from released;

  if v_released then
    update public.sona_pauses p set jobs_released = p.jobs_released + 1 where p.id = v_id;
  end if;
  return query select v_id, v_created, v_until, v_released;
end $$;

-- A success lifts the pause: the completion of the probe the pause let through.
create or replace function public.sona_lift_pause() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
begin
  update public.sona_pauses p
     set lifted_at = now(), lifted_by = new.id
   where p.lifted_at is null and p.probe_job = new.id;
  return null;
end $$;

drop trigger if exists sona_lift_pause on public.jobs;
create trigger sona_lift_pause after update of status on public.jobs
  for each row when (new.status = 'completed' and old.status is distinct from 'completed')
  execute function public.sona_lift_pause();

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

-- claim: as in 20261129000310 (the claim id becomes the lease token; a repeated claim gets its own
-- lease back; reuse_only finishing attempts), and nothing is claimed while the service is paused.
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

-- reclaim: as in 20261129000600 (expired leases, exhausted jobs, due dispatches with their round),
-- plus: jobs that waited out an outage for longer than pause_max_wait_seconds fail as unavailable;
-- while paused nothing is dispatched; once the pause has ended, one probe, then (lifted) all.
create or replace function public.reclaim_jobs(
  p_max_attempts integer, p_grace_seconds integer, p_limit integer,
  p_base_delay_ms integer, p_max_delay_ms integer)
returns setof public.reclaim_action
language plpgsql volatile security invoker set search_path = '' as $$
declare
  v_pause public.sona_pauses;
  v_limit integer := p_limit;
  v_max_wait interval := make_interval(secs => public.sona_setting('pause_max_wait_seconds'));
begin
  if not pg_try_advisory_xact_lock(hashtext('sona.reclaim_jobs')) then
    return;
  end if;

  return query
  with expired as (
    update public.jobs j
       set status = case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                         then 'pending' else 'failed' end,
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
     -- no lease at all (a row written as processing by hand) counts as expired
     where j.status = 'processing' and (j.lease_expires_at is null or j.lease_expires_at < now())
    returning j.id, j.status
  ), expired_attempts as (
    update public.job_attempts a
       set finished_at = now(), outcome = 'lease_expired',
           error = 'lease expired: the invocation crashed or timed out'
      from expired e
     where a.job_id = e.id and a.finished_at is null
  )
  select e.id, case when e.status = 'pending' then 'released' else 'failed' end, null::integer, null::integer
    from expired e;

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

-- 6. what operators see -----------------------------------------------------------------------

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

-- Only the service role drives the state machine and reads the figures; users get cancel_job and
-- sona_setting (read by the quota trigger, which runs as the inserting user).
do $$
declare fn text;
begin
  foreach fn in array array[
    'public.claim_job(uuid, uuid, integer, integer)',
    'public.reclaim_jobs(integer, integer, integer, integer, integer)',
    'public.lease_is_held(uuid, uuid)',
    'public.pause_service(uuid, uuid, text, text, text, integer)',
    'public.sona_pause_admits(uuid)',
    'public.sona_lift_pause()',
    'public.spend_stats(integer)']
  loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end $$;
revoke all on function public.cancel_job(uuid) from public, anon;
grant execute on function public.cancel_job(uuid) to authenticated, service_role;
revoke all on function public.sona_setting(text) from public, anon;
grant execute on function public.sona_setting(text) to authenticated, service_role;
revoke all on function public.sona_enforce_quota() from public, anon;
grant execute on function public.sona_enforce_quota() to authenticated, service_role;
