-- Dispatch through Cloud Tasks: reclaim names each task it creates after the job, its attempts and
-- the dispatch round, because Cloud Tasks keeps executed task names reserved for hours and refuses a
-- second task of the same name. Idempotent; valid on PostgreSQL 15 and newer.

alter table public.jobs add column if not exists dispatches integer not null default 0;

-- reclaim_action gains the two numbers that name a dispatch's task (null for other actions).
do $$ begin
  if not exists (
    select from pg_attribute
     where attrelid = 'public.reclaim_action'::regclass and attname = 'dispatch_round' and not attisdropped
  ) then
    drop function if exists public.reclaim_jobs(integer, integer, integer, integer, integer);
    alter type public.reclaim_action add attribute attempt integer, add attribute dispatch_round integer;
  end if;
end $$;

-- As in 20261129000310_idempotent_claim_and_finishing.sql, and each dispatch counts its round.
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
  update public.jobs j set dispatched_at = now(), dispatches = j.dispatches + 1
    from due where j.id = due.id
  returning j.id, 'dispatch'::text, j.attempts, j.dispatches;
end $$;

revoke all on function public.reclaim_jobs(integer, integer, integer, integer, integer)
  from public, anon, authenticated;
grant execute on function public.reclaim_jobs(integer, integer, integer, integer, integer) to service_role;
