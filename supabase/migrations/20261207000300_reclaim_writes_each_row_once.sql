-- Sona: a reclaim of 10,000 expired leases back under half a second (issue 34). Idempotent; valid on
-- PostgreSQL 15 and newer.
--
-- 1. The small SQL helpers that run once per row (sona_may_claim five times a reclaimed job,
--    sona_wait_status, and sona_stage_of / sona_stage_rank in every job's stage trigger) lose their
--    `set search_path`: PostgreSQL inlines a SQL function into the calling query only when it sets no
--    option, so each call was a function call of its own with the setting saved and restored around
--    it. Their bodies name no table or function, only their arguments and built-in operators.
-- 2. reclaim_jobs dispatches a released job that is due at once in the update that releases it,
--    instead of releasing every expired lease and then updating the same rows again to stamp their
--    dispatch (every row trigger and index entry twice, and a foreign-key check per row, since the
--    row was written by the same transaction). It does so only when that changes nothing: no pause
--    open, and every job that could be due fits in the batch. Otherwise as in 20261207000200.

-- Replacing functions takes no lock that generate's inserts wait on; bounded all the same.
set lock_timeout = '10s';
set statement_timeout = '5min';

-- 1. inlined helpers ------------------------------------------------------------------------------

alter function public.sona_may_claim(integer, boolean, integer) reset search_path;
alter function public.sona_wait_status(text, text) reset search_path;
alter function public.sona_stage_rank(text) reset search_path;
alter function public.sona_stage_of(text) reset search_path;

-- 2. reclaim_jobs writes each row once ----------------------------------------------------------

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
-- A released job that is due at once is dispatched by the update that releases it (issue 34: each
-- row written once, not released and then stamped again with every row trigger firing twice), when
-- that changes nothing: no pause is open, and every job that could be due fits in the batch, so the
-- order in which the batch is picked does not matter. Otherwise the dispatch statement picks them.
create or replace function public.reclaim_jobs(
  p_max_attempts integer, p_grace_seconds integer, p_limit integer,
  p_base_delay_ms integer, p_max_delay_ms integer)
returns setof public.reclaim_action
language plpgsql volatile security invoker set search_path = '' as $$
declare
  v_pause public.sona_pauses;
  v_limit integer := p_limit;
  v_grace interval := make_interval(secs => p_grace_seconds);
  v_max_wait interval := make_interval(secs => public.sona_setting('pause_max_wait_seconds'));
  v_legacy interval := make_interval(secs => public.sona_setting('legacy_processing_timeout_seconds'));
  v_at_release boolean;
begin
  if not pg_try_advisory_xact_lock(hashtext('sona.reclaim_jobs')) then
    return;
  end if;

  select * into v_pause from public.sona_pauses p where p.lifted_at is null;
  -- A job stamped here is left alone by the dispatch statement only when a grace period keeps it
  -- from being picked twice (dispatched_at = now() is not older than the grace period).
  v_at_release := v_pause.id is null and p_grace_seconds > 0
    and (select count(*) from (
           select from public.jobs j
            where j.status = 'processing' and j.lease_token is not null
              and (j.lease_expires_at is null or j.lease_expires_at < now())
            limit p_limit + 1) expiring)
      + (select count(*) from (
           select from public.jobs j
            where j.status in ('pending', 'queued')
              and public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
              and (j.run_after is null or j.run_after <= now())
              and (j.attempts > 0 or j.waiting_since is not null or j.created_at <= now() - v_grace)
              and (j.dispatched_at is null or j.dispatched_at <= now() - v_grace)
            limit p_limit + 1) waiting)
      <= p_limit;

  return query
  with expired as (
    update public.jobs j
       set status = case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                         then public.sona_wait_status(j.wait_status, j.mode) else 'failed' end,
           reuse_only = j.attempts >= p_max_attempts,
           error_message = case
             when j.attempts < p_max_attempts then 'The attempt timed out; retrying.'
             when public.sona_may_claim(j.attempts, true, p_max_attempts)
             then 'The attempt timed out; looking for the audio it stored.'
             else 'The job timed out after ' || j.attempts || ' attempts.' end,
           completed_at = case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                               then null else now() end,
           -- the backoff is drawn once (it has jitter) and both decides and sets the dispatch
           (run_after, dispatched_at, dispatches) = (
             select r.run_after,
                    case when r.dispatch then now() end,
                    j.dispatches + case when r.dispatch then 1 else 0 end
               from (select b.run_after,
                            v_at_release
                            and public.sona_may_claim(j.attempts, true, p_max_attempts)
                            and (b.run_after is null or b.run_after <= now())
                            -- not failed below for waiting out an outage
                            and (j.waiting_since is null or j.waiting_since > now() - v_max_wait)
                            and (j.attempts > 0 or j.waiting_since is not null
                                 or j.created_at <= now() - v_grace) as dispatch
                       from (select case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                                         -- backoff counts from when the lease expired: a crash
                                         -- found late is due at once
                                         then j.lease_expires_at
                                              + public.sona_backoff(j.attempts, p_base_delay_ms, p_max_delay_ms)
                                    end as run_after) b) r),
           lease_token = null,
           lease_expires_at = null
     where j.status = 'processing' and j.lease_token is not null
       and (j.lease_expires_at is null or j.lease_expires_at < now())
    returning j.id, j.status, j.dispatched_at is not null as dispatched, j.attempts, j.dispatches
  ), expired_attempts as (
    update public.job_attempts a
       set finished_at = now(), outcome = 'lease_expired',
           error = 'lease expired: the invocation crashed or timed out'
      from expired e
     where a.job_id = e.id and a.finished_at is null
  )
  select e.id, case when e.status in ('pending', 'queued') then 'released' else 'failed' end,
         null::integer, null::integer
    from expired e
  union all
  select e.id, 'dispatch'::text, e.attempts, e.dispatches from expired e where e.dispatched;

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
         error_message = 'The job could not be finished after ' || j.attempts || ' attempts; '
                         || 'please try again.',
         completed_at = now()
   where j.status in ('pending', 'queued')
     and not public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts)
  returning j.id, 'failed'::text, null::integer, null::integer;

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
       and (j.attempts > 0 or j.waiting_since is not null or j.created_at <= now() - v_grace)
       -- one dispatch per grace period, so overlapping reclaims never send a job twice
       and (j.dispatched_at is null or j.dispatched_at <= now() - v_grace)
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
