-- Sona jobs: upgrade of the existing table, the state machine and row level security.
-- Idempotent: applying it twice changes nothing. Valid on PostgreSQL 15 and newer.
-- Needs Supabase's auth schema (auth.users, auth.uid()) and roles anon, authenticated, service_role.

-- The table as the earlier worker created it (a fresh database gets it here). On a database that
-- already has it (the plug-in's, or the earlier worker's), nothing of the table changes here: its
-- columns, checks, policies, grants and triggers stay its owner's (docs/plugin-client.md).
create table if not exists public.jobs (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  prompt text not null,
  -- the plug-in's range (its generate function and its table allow 1 to 180 s)
  duration integer not null default 10 check (duration between 1 and 180),
  quality text not null default 'medium' check (quality in ('low', 'medium', 'high')),
  mode text not null default 'default',
  status text not null default 'pending'
    check (status in ('pending', 'queued', 'processing', 'completed', 'failed')),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  completed_at timestamptz,
  error_message text,
  result_url text,
  wav_url text,
  mp3_url text
);

-- Columns the worker owns in the new design.
alter table public.jobs
  add column if not exists attempts integer not null default 0,
  add column if not exists lease_token uuid,
  add column if not exists lease_expires_at timestamptz,
  add column if not exists run_after timestamptz,
  add column if not exists dispatched_at timestamptz,
  add column if not exists started_at timestamptz,
  add column if not exists audio jsonb;

-- One row per attempt, so an operator can see why a job failed three times.
create table if not exists public.job_attempts (
  job_id uuid not null references public.jobs (id) on delete cascade,
  attempt integer not null,
  lease_token uuid not null,
  started_at timestamptz not null default now(),
  finished_at timestamptz,
  outcome text check (outcome in ('completed', 'failed', 'released', 'lease_expired', 'stale')),
  error text,
  primary key (job_id, attempt)
);

-- updated_at is kept by the database, whoever writes.
create or replace function public.jobs_set_updated_at() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end $$;

-- Ours only where no other updated_at trigger keeps it (the plug-in has update_jobs_updated_at):
-- another owner's trigger is never dropped, and one is enough.
do $$ begin
  if not exists (
    select from pg_trigger t
     where t.tgrelid = 'public.jobs'::regclass and not t.tgisinternal
       and t.tgname <> 'jobs_set_updated_at' and t.tgname ilike '%updated%at%'
       and (t.tgtype & 2) = 2 and (t.tgtype & 16) = 16) then
    drop trigger if exists jobs_set_updated_at on public.jobs;
    create trigger jobs_set_updated_at before update on public.jobs
      for each row execute function public.jobs_set_updated_at();
  end if;
end $$;

-- Serve claim (by id), the expired-lease scan and the due-pending scan.
create index if not exists jobs_processing_lease_idx on public.jobs (lease_expires_at)
  where status = 'processing';
create index if not exists jobs_claimable_idx on public.jobs (created_at)
  where status in ('pending', 'queued');
create index if not exists jobs_status_created_idx on public.jobs (status, created_at);
create index if not exists jobs_user_idx on public.jobs (user_id, created_at desc);

-- Exponential backoff with equal jitter, capped: attempt 1 waits base/2..base, attempt 2 base..2*base.
create or replace function public.sona_backoff(p_attempt integer, p_base_ms integer, p_cap_ms integer)
returns interval language sql volatile as $$
  select make_interval(secs => (
    least(p_cap_ms::double precision, p_base_ms * power(2, greatest(p_attempt - 1, 0)))
    * (0.5 + random() / 2)) / 1000.0)
$$;

-- claim: one conditional UPDATE; zero rows means a duplicate delivery or a finished job.
create or replace function public.claim_job(
  p_job_id uuid, p_lease_seconds integer, p_max_attempts integer)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  with claimed as (
    update public.jobs j
       set status = 'processing',
           attempts = j.attempts + 1,
           lease_token = gen_random_uuid(),
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           started_at = now(),
           run_after = null,
           error_message = null
     where j.id = p_job_id
       and j.status in ('pending', 'queued')
       and j.attempts < p_max_attempts
       and (j.run_after is null or j.run_after <= now())
    returning j.*
  ), attempt as (
    insert into public.job_attempts (job_id, attempt, lease_token, started_at)
    select c.id, c.attempts, c.lease_token, now() from claimed c
    on conflict (job_id, attempt) do update
      set lease_token = excluded.lease_token, started_at = excluded.started_at,
          finished_at = null, outcome = null, error = null
  )
  select * from claimed
$$;

-- complete: fenced by the lease token; zero rows means a stale worker whose result is dropped.
create or replace function public.complete_job(
  p_job_id uuid, p_lease_token uuid, p_wav_url text, p_mp3_url text, p_audio jsonb)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  with done as (
    update public.jobs j
       set status = 'completed',
           wav_url = p_wav_url,
           mp3_url = p_mp3_url,
           result_url = p_mp3_url,
           audio = p_audio,
           completed_at = now(),
           error_message = null,
           lease_token = null,
           lease_expires_at = null
     where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
    returning j.*
  ), attempt as (
    update public.job_attempts a
       set finished_at = now(), outcome = 'completed'
      from done d
     where a.job_id = d.id and a.lease_token = p_lease_token
  )
  select * from done
$$;

-- fail: fenced like complete. A retryable failure goes back to pending with backoff while
-- attempts remain; otherwise the job fails with the message the plug-in shows.
create or replace function public.fail_job(
  p_job_id uuid, p_lease_token uuid, p_error text, p_retryable boolean,
  p_max_attempts integer, p_base_delay_ms integer, p_max_delay_ms integer)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  with ended as (
    update public.jobs j
       set status = case when p_retryable and j.attempts < p_max_attempts
                         then 'pending' else 'failed' end,
           run_after = case when p_retryable and j.attempts < p_max_attempts
                            then now() + public.sona_backoff(j.attempts, p_base_delay_ms, p_max_delay_ms) end,
           error_message = case when p_retryable and j.attempts >= p_max_attempts
                                then p_error || ' (gave up after ' || j.attempts || ' attempts)'
                                else p_error end,
           completed_at = case when p_retryable and j.attempts < p_max_attempts then null else now() end,
           dispatched_at = null,
           lease_token = null,
           lease_expires_at = null
     where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
    returning j.*
  ), attempt as (
    update public.job_attempts a
       set finished_at = now(),
           outcome = case when e.status = 'pending' then 'released' else 'failed' end,
           error = p_error
      from ended e
     where a.job_id = e.id and a.lease_token = p_lease_token
  )
  select * from ended
$$;

-- What one reclaim did: a row per job it touched.
do $$ begin
  create type public.reclaim_action as (job_id uuid, action text);
exception when duplicate_object then null;
end $$;

-- reclaim: single-flight (a second concurrent call returns nothing), set-based.
--   'released'  expired lease, attempts remain: back to pending with backoff counted from the
--               lease's expiry (so it is also dispatched in the same call once that has passed)
--   'failed'    expired lease (or leftover pending) with no attempts left
--   'dispatch'  due now: a released retry past run_after, or a job whose webhook never came
create or replace function public.reclaim_jobs(
  p_max_attempts integer, p_grace_seconds integer, p_limit integer,
  p_base_delay_ms integer, p_max_delay_ms integer)
returns setof public.reclaim_action
language plpgsql volatile security invoker set search_path = '' as $$
begin
  if not pg_try_advisory_xact_lock(hashtext('sona.reclaim_jobs')) then
    return;
  end if;

  return query
  with expired as (
    update public.jobs j
       set status = case when j.attempts < p_max_attempts then 'pending' else 'failed' end,
           -- backoff counts from when the lease expired: a crash found late is due at once
           run_after = case when j.attempts < p_max_attempts
                            then j.lease_expires_at
                                 + public.sona_backoff(j.attempts, p_base_delay_ms, p_max_delay_ms) end,
           error_message = case when j.attempts < p_max_attempts
                                then 'The attempt timed out; retrying.'
                                else 'The job timed out after ' || j.attempts || ' attempts.' end,
           completed_at = case when j.attempts < p_max_attempts then null else now() end,
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
  select e.id, case when e.status = 'pending' then 'released' else 'failed' end from expired e;

  return query
  update public.jobs j
     set status = 'failed',
         error_message = coalesce(j.error_message, 'The job could not be processed')
                         || ' (no attempts left after ' || j.attempts || ')',
         completed_at = now()
   where j.status in ('pending', 'queued') and j.attempts >= p_max_attempts
  returning j.id, 'failed'::text;

  return query
  with due as (
    select j.id from public.jobs j
     where j.status in ('pending', 'queued')
       and j.attempts < p_max_attempts
       and (j.run_after is null or j.run_after <= now())
       -- a first attempt waits out the grace period so a webhook in flight is not raced
       and (j.attempts > 0 or j.created_at <= now() - make_interval(secs => p_grace_seconds))
       -- one dispatch per grace period, so overlapping reclaims never send a job twice
       and (j.dispatched_at is null or j.dispatched_at <= now() - make_interval(secs => p_grace_seconds))
     order by coalesce(j.run_after, j.created_at)
     limit p_limit
     for update skip locked
  )
  update public.jobs j set dispatched_at = now()
    from due where j.id = due.id
  returning j.id, 'dispatch'::text;
end $$;

-- Only the service role may drive the state machine (Supabase grants EXECUTE to everyone by default).
do $$
declare fn text;
begin
  foreach fn in array array[
    'public.claim_job(uuid, integer, integer)',
    'public.complete_job(uuid, uuid, text, text, jsonb)',
    'public.fail_job(uuid, uuid, text, boolean, integer, integer, integer)',
    'public.reclaim_jobs(integer, integer, integer, integer, integer)',
    'public.sona_backoff(integer, integer, integer)']
  loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end $$;

-- Row level security: users read and create their own jobs; the worker owns everything else.
alter table public.jobs enable row level security;
alter table public.job_attempts enable row level security;

-- Our two policies, beside whatever policies the table already has (the plug-in's own-row, admin and
-- public-showcase policies stay: they are its owner's). Results stay the worker's whatever those
-- policies allow: the guard trigger in 20261202000100_plugin_client.sql refuses a user's write of a
-- status, URL, path, file name or audio figure.
drop policy if exists jobs_select_own on public.jobs;
create policy jobs_select_own on public.jobs for select to authenticated
  using ((select auth.uid()) = user_id);
drop policy if exists jobs_insert_own on public.jobs;
create policy jobs_insert_own on public.jobs for insert to authenticated
  with check ((select auth.uid()) = user_id and status = 'pending');

-- Grants: a user may read their rows and name the request columns. On a table this project created
-- (no other owner's policies, so no other owner's grants to keep) that is all they may do, and anon
-- gets nothing; on an existing table nothing is taken away.
do $$ begin
  if not exists (select from pg_policies where schemaname = 'public' and tablename = 'jobs'
                  and policyname not in ('jobs_select_own', 'jobs_insert_own')) then
    revoke all on public.jobs from anon;
    revoke insert, update, delete, truncate on public.jobs from authenticated;
  end if;
end $$;
grant select on public.jobs to authenticated;
grant insert (id, user_id, prompt, duration, quality, mode) on public.jobs to authenticated;
revoke all on public.job_attempts from anon, authenticated;
grant all on public.jobs, public.job_attempts to service_role;
