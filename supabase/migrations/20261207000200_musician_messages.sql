-- Sona: what the musician reads (issue 35). Idempotent; valid on PostgreSQL 15 and newer.
--
-- error_message is what the plug-in shows as it is, so it comes from a small set of messages, one
-- per outcome (README, "What the musician reads"); the provider's own words stay where an operator
-- finds them by job id: the attempt's record (job_attempts.error) and the log line.
--
-- 1. fail_job takes the attempt's detail apart from the musician's message: the row gets p_error
--    (the worker's message for the outcome), the attempt gets p_detail (what went wrong, the
--    provider's words included; p_error when null). Otherwise as in the baseline.
-- 2. reclaim_jobs: a waiting job with no attempts left said its last waiting message with
--    " (no attempts left after N)" appended ("The attempt timed out; retrying. (no attempts left
--    after 3)"); it now says one message of its own. Otherwise as in the baseline.

-- The plug-in's generate inserts into jobs while this runs: give up on a lock rather than queue
-- every insert behind a wait (the deploy is then retried), and never run on unbounded.
set lock_timeout = '10s';
set statement_timeout = '5min';

-- 1. fail: the musician's message on the row, the detail on the attempt ----------------------------

-- The old signature goes: two overloads would make every call that leaves p_detail out ambiguous.
-- A worker deployed before this migration calls it without p_detail, which the new one defaults.
-- squawk-ignore ban-drop-function
drop function if exists public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb);
create or replace function public.fail_job(
  p_job_id uuid, p_lease_token uuid, p_error text, p_retryable boolean,
  p_max_attempts integer, p_base_delay_ms integer, p_max_delay_ms integer,
  p_outcome_class text default null, p_timings_ms jsonb default null, p_detail text default null)
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
           error = coalesce(p_detail, p_error),
           outcome_class = p_outcome_class,
           timings_ms = p_timings_ms
      from ended e
     where a.job_id = e.id and a.lease_token = p_lease_token
  )
  select * from ended
$$;

-- 2. reclaim: one message for a waiting job out of attempts ----------------------------------------

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
         error_message = 'The job could not be finished after ' || j.attempts || ' attempts; '
                         || 'please try again.',
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

-- Only the service role drives the state machine (as the baseline grants the rest).
revoke all on function public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb, text)
  from public, anon, authenticated;
grant execute on function public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb, text)
  to service_role;
