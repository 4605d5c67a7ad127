-- Sona: a claim that can be repeated, and a paid, stored output that is always completed.
-- Idempotent; valid on PostgreSQL 15 and newer. Replaces claim_job, fail_job and reclaim_jobs.
--
-- 1. The request makes a claim id once and sends it with every try of its claim; the id becomes
--    the lease token. A try whose claim already committed (its answer was lost on the way back)
--    gets that same lease again, without counting another attempt.
-- 2. An attempt can store its files and then lose its lease before completing the row (the
--    database was away, or the process died). With attempts left, the next attempt reuses the
--    files. On the last paid attempt there is none left, so the expired lease now releases the job
--    for a finishing attempt (reuse_only): it completes the job from the stored files, or fails it
--    if there are none, and never pays for a generation. So at most MAX_ATTEMPTS attempts pay,
--    and finishing attempts are bounded too (at most MAX_ATTEMPTS more): nothing is left stuck.

alter table public.jobs add column if not exists reuse_only boolean not null default false;

-- May a job with these attempts be claimed again: while paid attempts remain, then (reuse_only)
-- for at most as many finishing attempts.
create or replace function public.sona_may_claim(
  p_attempts integer, p_reuse_only boolean, p_max_attempts integer)
returns boolean language sql immutable set search_path = '' as $$
  select p_attempts < p_max_attempts or (p_reuse_only and p_attempts < 2 * p_max_attempts)
$$;

drop function if exists public.claim_job(uuid, integer, integer);

create or replace function public.claim_job(
  p_job_id uuid, p_claim_id uuid, p_lease_seconds integer, p_max_attempts integer)
returns setof public.jobs
language plpgsql volatile security invoker set search_path = '' as $$
begin
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

  if not found then
    -- A new statement, so a new snapshot: it sees this claim id's commit even when that commit
    -- happened while the update above waited for the row.
    return query
    select j.* from public.jobs j
     where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_claim_id;
  end if;
end $$;

-- fail: as before, except that a finishing attempt's transient failure releases it again while
-- finishing attempts remain.
create or replace function public.fail_job(
  p_job_id uuid, p_lease_token uuid, p_error text, p_retryable boolean,
  p_max_attempts integer, p_base_delay_ms integer, p_max_delay_ms integer)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  with ended as (
    update public.jobs j
       set status = case when p_retryable and public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
                         then 'pending' else 'failed' end,
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
           outcome = case when e.status = 'pending' then 'released' else 'failed' end,
           error = p_error
      from ended e
     where a.job_id = e.id and a.lease_token = p_lease_token
  )
  select * from ended
$$;

-- reclaim: as before, except that an expired lease with no paid attempts left is released for a
-- finishing attempt (it may have stored its files), and only a spent finishing budget fails it.
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
  select e.id, case when e.status = 'pending' then 'released' else 'failed' end from expired e;

  return query
  update public.jobs j
     set status = 'failed',
         error_message = coalesce(j.error_message, 'The job could not be processed')
                         || ' (no attempts left after ' || j.attempts || ')',
         completed_at = now()
   where j.status in ('pending', 'queued')
     and not public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
  returning j.id, 'failed'::text;

  return query
  with due as (
    select j.id from public.jobs j
     where j.status in ('pending', 'queued')
       and public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
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
    'public.claim_job(uuid, uuid, integer, integer)',
    'public.fail_job(uuid, uuid, text, boolean, integer, integer, integer)',
    'public.reclaim_jobs(integer, integer, integer, integer, integer)',
    'public.sona_may_claim(integer, boolean, integer)']
  loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end $$;
