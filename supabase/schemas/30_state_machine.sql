-- The state machine: pending | queued -> processing -> completed | failed | cancelled, and
-- processing -> pending | queued when an attempt is released for a retry or an outage. Every
-- transition is one call of one of these functions. claim_job stamps a lease; every later write of
-- the attempt (advance_stage, record_generation, forget_generation, complete_job, fail_job,
-- pause_service) is fenced by it, and zero rows means a stale worker whose result is dropped.

-- Exponential backoff with equal jitter, capped: attempt 1 waits base/2..base, attempt 2 base..2*base.
create or replace function public.sona_backoff(p_attempt integer, p_base_ms integer, p_cap_ms integer)
returns interval language sql volatile as $$
  select make_interval(secs => (
    least(p_cap_ms::double precision, p_base_ms * power(2, greatest(p_attempt - 1, 0)))
    * (0.5 + random() / 2)) / 1000.0)
$$;
revoke all on function public.sona_backoff(integer, integer, integer) from public, anon, authenticated;
grant execute on function public.sona_backoff(integer, integer, integer) to service_role;

-- A claim can be repeated: the request makes a claim id once and sends it with every try; the id
-- becomes the lease token, and a try whose claim already committed (its answer was lost) gets that
-- same lease back without counting another attempt. At most p_max_attempts attempts pay; after
-- them, an expired lease releases the job for finishing attempts (reuse_only) that complete it from
-- the files a paid attempt stored, or fail it, and never pay.
-- May a job with these attempts be claimed again: while paid attempts remain, then (reuse_only)
-- for at most as many finishing attempts.
create or replace function public.sona_may_claim(
  p_attempts integer, p_reuse_only boolean, p_max_attempts integer)
returns boolean language sql immutable as $$
  select p_attempts < p_max_attempts or (p_reuse_only and p_attempts < 2 * p_max_attempts)
$$;
revoke all on function public.sona_may_claim(integer, boolean, integer) from public, anon, authenticated;
grant execute on function public.sona_may_claim(integer, boolean, integer) to service_role;

-- Account-level outages pause the service: pause_service() records one open pause and releases the
-- job without using up its attempt; claim_job claims nothing while paused, then lets one probe
-- through; the probe's completion lifts the pause.
create table public.sona_pauses (
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
create unique index sona_pauses_one_open on public.sona_pauses (open_slot) where lifted_at is null;
alter table public.sona_pauses enable row level security;
revoke all on public.sona_pauses from public, anon, authenticated;
grant all on public.sona_pauses to service_role;

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
revoke all on function public.sona_pause_admits(uuid) from public, anon, authenticated;
grant execute on function public.sona_pause_admits(uuid) to service_role;

-- claim: one conditional UPDATE that counts the attempt and stamps the lease; zero rows means a
-- duplicate delivery, a finished job or a pause (then the repeated claim's own lease is answered, if
-- this claim id already holds it).
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
revoke all on function public.claim_job(uuid, uuid, integer, integer) from public, anon, authenticated;
grant execute on function public.claim_job(uuid, uuid, integer, integer) to service_role;

-- The stage write before generating is the last fence before a paid call. It already matches
-- nothing once the owner has cancelled the job (the cancel clears the lease), so the worker needs no
-- separate lease check: this says which of the two it was. A stale attempt still gets no row; a
-- cancelled job raises SQ003, which the worker reads as "cancelled", never as an error of its own.
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
revoke all on function public.advance_stage(uuid, uuid, text) from public, anon, authenticated;
grant execute on function public.advance_stage(uuid, uuid, text) to service_role;

-- The id of the generation just paid for, on the row of the attempt that holds the lease. A row that
-- already names another id is left alone (the caller forgets the old one first); the same id again
-- is a no-op, so a retried write after a lost answer is safe. Answers the row, or nothing when stale.
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
revoke all on function public.record_generation(uuid, uuid, text, text) from public, anon, authenticated;
grant execute on function public.record_generation(uuid, uuid, text, text) to service_role;

-- The provider no longer knows this id (expired or unknown): the only way to a new payment for a job
-- that had one. Counted, and fenced by the lease like record_generation.
create or replace function public.forget_generation(
  p_job_id uuid, p_lease_token uuid, p_generation_id text)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  update public.jobs j
     set generation_id = null,
         generation_model = null,
         generation_posted_at = null,
         generations_lost = j.generations_lost + 1
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
     and j.generation_id = p_generation_id
  returning j.*
$$;
revoke all on function public.forget_generation(uuid, uuid, text) from public, anon, authenticated;
grant execute on function public.forget_generation(uuid, uuid, text) to service_role;

-- complete: fenced by the lease; writes the earlier worker's URLs and what the plug-in's player reads
-- (master_path, preview_path, filename, enhanced_prompt), and the attempt keeps its timings. Then
-- the owner's outputs beyond their newest keep_outputs_per_user lose their paths (their files are
-- queued for deletion: jobs_queue_expired_files, 60_storage.sql), as the plug-in's old worker did.
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
revoke all on function public.complete_job(uuid, uuid, text, text, jsonb, jsonb, text, text, text, text) from public, anon, authenticated;
grant execute on function public.complete_job(uuid, uuid, text, text, jsonb, jsonb, text, text, text, text) to service_role;

-- fail: fenced like complete. A retryable failure goes back to wait (as the status the job was
-- inserted with) with backoff while attempts remain; otherwise the job fails with the message the
-- plug-in shows (p_error: one of README's "What the musician reads"). The attempt keeps what went
-- wrong (p_detail, the provider's own words included; p_error when null), its timings and the
-- class of its failure.
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
revoke all on function public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb, text) from public, anon, authenticated;
grant execute on function public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb, text) to service_role;

-- pause: record the outage (once) and release the job for after the pause without using up its
-- attempt. A pause whose end has passed (its probe met the outage again) is re-armed. The release
-- is fenced like fail_job; the pause is recorded even for a stale lease (the account is at fault
-- either way). Answers the status the released job waits as.
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
revoke all on function public.pause_service(uuid, uuid, text, text, text, integer) from public, anon, authenticated;
grant execute on function public.pause_service(uuid, uuid, text, text, text, integer) to service_role;

-- A success lifts the pause: the completion of the probe the pause let through.
create or replace function public.sona_lift_pause() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
begin
  update public.sona_pauses p
     set lifted_at = now(), lifted_by = new.id
   where p.lifted_at is null and p.probe_job = new.id;
  return null;
end $$;
revoke all on function public.sona_lift_pause() from public, anon, authenticated;
grant execute on function public.sona_lift_pause() to service_role;
create trigger sona_lift_pause after update of status on public.jobs
  for each row when (new.status = 'completed' and old.status is distinct from 'completed')
  execute function public.sona_lift_pause();

-- One call: the owner's (or the service role's) live job becomes 'cancelled' and loses its lease, so
-- every fenced write of its attempt matches nothing. Answers the cancelled row, or nothing: not the
-- caller's job, unknown, or already finished. Security definer because users have no UPDATE on
-- jobs; it checks the owner itself.
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
revoke all on function public.cancel_job(uuid) from public, anon;
grant execute on function public.cancel_job(uuid) to authenticated, service_role;

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
