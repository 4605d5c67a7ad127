-- Sona: a reclaim of 10,000 expired leases well under half a second (issue 34, second pass).
-- Idempotent; valid on PostgreSQL 15 and newer.
--
-- 1. The row triggers the release fires skip their call when they would change nothing: a WHEN clause
--    (evaluated inline, no plpgsql call, no search_path set and restored) on jobs_set_updated_at,
--    jobs_guard, jobs_guard_request, jobs_derive_stage and job_attempts_outcome_class, and the
--    release writes updated_at, the stage and the outcome class itself. An insert trigger cannot
--    name OLD in its WHEN clause, so jobs_guard and jobs_derive_stage get an insert trigger of
--    their own, named to fire where they did.
-- 2. The reclaim answers counts of the jobs it released and failed, and rows only for the jobs to
--    dispatch, as one JSON object: the caller only counted the others, and 10,000 released rows cost
--    more to send and validate than to release. A new answer is a new function,
--    reclaim_and_dispatch: reclaim_jobs cannot change its return type in place (and the migrations
--    before this one make it again when applied twice). reclaim_jobs and its row type
--    reclaim_action are dropped; both take the same single-flight lock, so a worker of the previous
--    release still running during a deploy never reclaims beside the new one.

-- Replacing triggers and functions takes a brief lock on jobs; bounded all the same.
set lock_timeout = '10s';
set statement_timeout = '5min';

-- 1. WHEN clauses -----------------------------------------------------------------------------------

-- Only where the migrations made it (a plug-in table keeps its own updated_at trigger instead).
do $$ begin
  if exists (select from pg_trigger t
              where t.tgrelid = 'public.jobs'::regclass and t.tgname = 'jobs_set_updated_at') then
    create or replace trigger jobs_set_updated_at before update on public.jobs
      for each row when (new.updated_at is distinct from now())
      execute function public.jobs_set_updated_at();
  end if;
end $$;

-- It acts only for a user, or on a write to 'processing' that sets no new lease; the insert's
-- trigger is its own (an insert has no old row to name). Named so both fire where jobs_guard did.
create or replace trigger jobs_guard before update on public.jobs
  for each row
  when (current_user in ('anon', 'authenticated')
        or (old.status in ('pending', 'queued') and new.status = 'processing'
            and new.lease_token is not distinct from old.lease_token))
  execute function public.jobs_guard();
create or replace trigger jobs_guard_insert before insert on public.jobs
  for each row when (current_user in ('anon', 'authenticated'))
  execute function public.jobs_guard();

create or replace trigger jobs_guard_request before update on public.jobs
  for each row when (current_user in ('anon', 'authenticated'))
  execute function public.jobs_guard_request();

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
create or replace trigger jobs_derive_stage before update on public.jobs
  for each row
  when (new.stage is distinct from public.sona_derived_stage(new.status, old.status, new.lease_token,
                                                             old.lease_token, new.stage, old.stage)
        or new.peaks_url is distinct from new.audio ->> 'peaks_url')
  execute function public.jobs_derive_stage();
create or replace trigger jobs_derive_stage_insert before insert on public.jobs
  for each row execute function public.jobs_derive_stage();

-- Skipped when it would change nothing (reclaim_and_dispatch sets the class of the attempts it ends).
create or replace trigger job_attempts_outcome_class before insert or update on public.job_attempts
  for each row
  when ((new.outcome = 'lease_expired' and new.outcome_class is null)
        or (new.outcome is null and (new.outcome_class is not null or new.timings_ms is not null)))
  execute function public.job_attempts_outcome_class();

-- 2. the reclaim's answer ---------------------------------------------------------------------------

-- The old function goes, and its row type with it (the migrations before this one make them again
-- when applied twice; dropped here again). Its one caller is the scheduler's reclaim door: a
-- previous release's door that runs between this migration and the new functions' deploy fails
-- that run, and Cloud Scheduler's next run, on the new door, does the work; nothing is lost, since
-- an expired lease stays expired until some reclaim takes it.
-- squawk-ignore ban-drop-function
drop function if exists public.reclaim_jobs(integer, integer, integer, integer, integer);
-- squawk-ignore ban-drop-type
drop type if exists public.reclaim_action;

-- reclaim: single-flight (a second concurrent call does nothing), set-based, one statement per kind
-- of work. It answers what it did as one JSON object: how many jobs it released and failed, and the
-- jobs to dispatch with what names their tasks, {"released": n, "failed": n, "dispatch": [{"job_id",
-- "attempt", "dispatch_round"}]}; the caller acts on the dispatches only, so the others are counts
-- (issue 34: 10,000 released rows cost more to send and read than the release itself).
--   released  expired lease, attempts (or finishing attempts) remain: back to wait, with backoff
--             counted from the lease's expiry (so it is also dispatched in the same call once due)
--   failed    expired lease with nothing left; the plug-in's old worker's job (processing with no
--             lease) once older than legacy_processing_timeout_seconds (never run again: it may
--             have paid); a waiting job with no attempts left; a job that waited out an outage
--             longer than pause_max_wait_seconds
--   dispatch  due now: a released retry past run_after, or a job whose webhook never came (after
--             the grace period), at most one per grace period, with its dispatch round; nothing
--             while paused, and one probe once the pause has ended
-- A released job that is due at once is dispatched by the update that releases it (issue 34: each
-- row written once, not released and then stamped again with every row trigger firing twice), when
-- that changes nothing: no pause is open, and every job that could be due fits in the batch, so the
-- order in which the batch is picked does not matter. Otherwise the dispatch statement picks them.
-- The release writes updated_at, the stage and the attempt's outcome class itself, as the row
-- triggers would, so their WHEN clauses skip them (20_job_rows.sql): 10,000 rows are 50,000 fewer
-- trigger calls.
create or replace function public.reclaim_and_dispatch(
  p_max_attempts integer, p_grace_seconds integer, p_limit integer,
  p_base_delay_ms integer, p_max_delay_ms integer)
returns jsonb
language plpgsql volatile security invoker set search_path = '' as $$
declare
  v_pause public.sona_pauses;
  v_limit integer := p_limit;
  v_grace interval := make_interval(secs => p_grace_seconds);
  v_max_wait interval := make_interval(secs => public.sona_setting('pause_max_wait_seconds'));
  v_legacy interval := make_interval(secs => public.sona_setting('legacy_processing_timeout_seconds'));
  v_at_release boolean;
  v_released integer;
  v_failed integer;
  v_count integer;
  v_dispatch jsonb;
  v_more jsonb;
begin
  -- the lock reclaim_jobs took, its name kept: a previous release's reclaim never runs beside this one
  if not pg_try_advisory_xact_lock(hashtext('sona.reclaim_jobs')) then
    return jsonb_build_object('released', 0, 'failed', 0, 'dispatch', '[]'::jsonb);
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

  with expired as (
    update public.jobs j
       set status = case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                         then public.sona_wait_status(j.wait_status, j.mode) else 'failed' end,
           -- the stage those statuses imply (sona_stage_of), as jobs_derive_stage would set it
           stage = case when public.sona_may_claim(j.attempts, true, p_max_attempts)
                        then 'queued' else 'failed' end,
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
           lease_expires_at = null,
           updated_at = now(),
           -- Unchanged keys, named: a non-HOT update of a key it does not name marks that index
           -- "logically unchanged", and PostgreSQL then tries a bottom-up deletion pass on each full
           -- leaf page, which finds nothing to delete here (the old versions are this transaction's
           -- own) before splitting it anyway: about a tenth of the release's time (issue 34).
           id = j.id, user_id = j.user_id, created_at = j.created_at
     where j.status = 'processing' and j.lease_token is not null
       and (j.lease_expires_at is null or j.lease_expires_at < now())
    returning j.id, j.status, j.dispatched_at is not null as dispatched, j.attempts, j.dispatches
  ), expired_attempts as (
    update public.job_attempts a
       set finished_at = now(), outcome = 'lease_expired',
           -- as job_attempts_outcome_class would set it: an expired lease timed out
           outcome_class = coalesce(a.outcome_class, 'timeout'),
           error = 'lease expired: the invocation crashed or timed out',
           -- unchanged keys, named: as for the jobs above
           job_id = a.job_id, attempt = a.attempt, started_at = a.started_at
      from expired e
     where a.job_id = e.id and a.finished_at is null
  )
  select count(*) filter (where e.status in ('pending', 'queued')),
         count(*) filter (where e.status not in ('pending', 'queued')),
         coalesce(jsonb_agg(jsonb_build_object('job_id', e.id, 'attempt', e.attempts,
                                               'dispatch_round', e.dispatches))
                    filter (where e.dispatched), '[]'::jsonb)
    into v_released, v_failed, v_dispatch
    from expired e;

  update public.jobs j
     set status = 'failed',
         error_message = 'The job did not finish; please try again.',
         completed_at = now()
   where j.status = 'processing' and j.lease_token is null
     and j.updated_at <= now() - v_legacy;
  get diagnostics v_count = row_count;
  v_failed := v_failed + v_count;

  update public.jobs j
     set status = 'failed',
         error_message = 'The job could not be finished after ' || j.attempts || ' attempts; '
                         || 'please try again.',
         completed_at = now()
   where j.status in ('pending', 'queued')
     and not public.sona_may_claim(j.attempts, j.reuse_only, p_max_attempts);
  get diagnostics v_count = row_count;
  v_failed := v_failed + v_count;

  -- Waited out an outage too long: the service, not the request, was at fault.
  update public.jobs j
     set status = 'failed',
         error_message = 'The audio service was unavailable for too long to make this audio; '
                         || 'nothing was wrong with your request. Please try again.',
         completed_at = now(),
         run_after = null
   where j.status in ('pending', 'queued')
     and (j.waiting_since <= now() - v_max_wait
          or (v_pause.id is not null and j.created_at <= now() - v_max_wait));
  get diagnostics v_count = row_count;
  v_failed := v_failed + v_count;

  if v_pause.id is not null then
    if v_pause.until > now()
       or (v_pause.probe_job is not null
           and exists (select from public.jobs j where j.id = v_pause.probe_job and j.status = 'processing')) then
      -- paused, or its probe is running: dispatch nothing
      return jsonb_build_object('released', v_released, 'failed', v_failed, 'dispatch', v_dispatch);
    end if;
    v_limit := least(p_limit, 1);  -- the pause has ended: one probe first
  end if;

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
  ), stamped as (
    update public.jobs j set dispatched_at = now(), dispatches = j.dispatches + 1, updated_at = now()
      from due where j.id = due.id
    returning j.id, j.attempts, j.dispatches
  )
  select coalesce(jsonb_agg(jsonb_build_object('job_id', s.id, 'attempt', s.attempts,
                                               'dispatch_round', s.dispatches)), '[]'::jsonb)
    into v_more
    from stamped s;
  return jsonb_build_object('released', v_released, 'failed', v_failed, 'dispatch', v_dispatch || v_more);
end $$;
revoke all on function public.reclaim_and_dispatch(integer, integer, integer, integer, integer) from public, anon, authenticated;
grant execute on function public.reclaim_and_dispatch(integer, integer, integer, integer, integer) to service_role;
