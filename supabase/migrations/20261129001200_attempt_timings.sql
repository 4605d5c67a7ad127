-- Sona: operator figures. Each attempt keeps its step timings and the class of its outcome, written
-- by the same fenced call that ends it; job_stats() computes every figure from them in SQL.
-- Idempotent; valid on PostgreSQL 15 and newer. Replaces complete_job, fail_job and job_stats.

alter table public.job_attempts
  add column if not exists timings_ms jsonb,
  add column if not exists outcome_class text;

do $$ begin
  alter table public.job_attempts add constraint job_attempts_outcome_class_check check (outcome_class in
    ('provider_permanent', 'provider_transient', 'storage', 'timeout', 'account', 'database', 'internal'));
exception when duplicate_object then null;
end $$;

-- reclaim_jobs (not redefined here) ends an expired attempt with outcome 'lease_expired': that is a
-- timeout. And claim_job, re-claiming an attempt whose answer was lost, clears the outcome: the
-- attempt's figures go with it.
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

drop trigger if exists job_attempts_outcome_class on public.job_attempts;
create trigger job_attempts_outcome_class before insert or update on public.job_attempts
  for each row execute function public.job_attempts_outcome_class();

-- job_stats reads a window of jobs by creation and their attempts by start.
create index if not exists jobs_created_idx on public.jobs (created_at);
create index if not exists job_attempts_started_idx on public.job_attempts (started_at);

-- complete: as in 20261128000000_jobs_state_machine.sql, and the attempt keeps its timings.
drop function if exists public.complete_job(uuid, uuid, text, text, jsonb);
create or replace function public.complete_job(
  p_job_id uuid, p_lease_token uuid, p_wav_url text, p_mp3_url text, p_audio jsonb,
  p_timings_ms jsonb default null)
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
       set finished_at = now(), outcome = 'completed', outcome_class = null, timings_ms = p_timings_ms
      from done d
     where a.job_id = d.id and a.lease_token = p_lease_token
  )
  select * from done
$$;

-- fail: as in 20261129000310_idempotent_claim_and_finishing.sql, and the attempt keeps its timings
-- and the class of its failure.
drop function if exists public.fail_job(uuid, uuid, text, boolean, integer, integer, integer);
create or replace function public.fail_job(
  p_job_id uuid, p_lease_token uuid, p_error text, p_retryable boolean,
  p_max_attempts integer, p_base_delay_ms integer, p_max_delay_ms integer,
  p_outcome_class text default null, p_timings_ms jsonb default null)
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
           error = p_error,
           outcome_class = p_outcome_class,
           timings_ms = p_timings_ms
      from ended e
     where a.job_id = e.id and a.lease_token = p_lease_token
  )
  select * from ended
$$;

-- Every figure an operator watches, for the jobs created in the window (and their attempts).
--   throughput       jobs completed per minute of the window, and the busiest minute
--   attempts         attempts ended, and failed attempts by class (share of attempts ended)
--   queue_wait_s     insert to the start of the first attempt
--   processing_s     start of the last attempt to completion, completed jobs
--   provider         the provider step's time (its in-attempt retries included), and the share of
--                    attempts that called it and failed with a provider class
--   storage          attempts that stored both files against those whose storage step failed, and
--                    the time from the WAV upload's start to the MP3 stored
--   retries          attempts beyond the first, per job that started
create or replace function public.job_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker set search_path = '' as $$
  with since as (
    select now() - make_interval(hours => p_window_hours) as t
  ), w as (
    select j.id, j.status, j.attempts, j.created_at, j.started_at, j.completed_at, j.error_message,
           j.lease_expires_at
      from public.jobs j, since where j.created_at >= since.t
  ), a as (
    -- an attempt starts after its job is created, so the range on started_at only narrows the scan
    select a.attempt, a.started_at, a.finished_at, a.outcome, a.outcome_class,
           (a.timings_ms ->> 'generate')::double precision / 1000 as generate_s,
           (a.timings_ms ->> 'upload')::double precision / 1000 as upload_s,
           w.created_at
      from public.job_attempts a join w on w.id = a.job_id, since
     where a.started_at >= since.t
  ), finished as (
    select extract(epoch from completed_at - started_at)::double precision as seconds
      from w where status = 'completed' and started_at is not null
  ), ended as (
    select count(*) filter (where status = 'failed') as failed,
           count(*) filter (where status in ('completed', 'failed')) as ended
      from w
  ), per_minute as (
    select date_trunc('minute', completed_at) as minute, count(*) as n
      from w where status = 'completed' group by 1
  ), attempt_figures as (
    select count(*) filter (where outcome is not null) as ended,
           count(*) filter (where generate_s is not null) as provider_calls,
           count(*) filter (where generate_s is not null
                              and outcome_class in ('provider_permanent', 'provider_transient')) as provider_errors,
           count(*) filter (where upload_s is not null) as stored,
           count(*) filter (where outcome_class = 'storage') as storage_failed,
           percentile_cont(array[0.5, 0.95]) within group (order by generate_s) as generate_p,
           percentile_cont(0.95) within group (order by upload_s) as upload_p95
      from a
  ), waits as (
    select percentile_cont(array[0.5, 0.95]) within group (
             order by extract(epoch from started_at - created_at)::double precision) as p
      from a where attempt = 1
  ), retries as (
    select avg(attempts - 1) as avg, max(attempts - 1) as max,
           count(*) filter (where attempts > 1) as retried
      from w where attempts > 0
  ), classes as (
    select outcome_class, count(*) as n from a where outcome_class is not null group by 1
  )
  select jsonb_build_object(
    'window_hours', p_window_hours,
    'total', (select count(*) from w),
    'by_status', coalesce(
      (select jsonb_object_agg(status, n) from (select status, count(*) as n from w group by status) s),
      '{}'::jsonb),
    'failure_rate', (select case when ended = 0 then null
                                 else round(failed::numeric / ended, 4) end from ended),
    'avg_processing_s', (select round(avg(seconds)::numeric, 3) from finished),
    'p95_processing_s', (select round((percentile_cont(0.95) within group (order by seconds))::numeric, 3)
                           from finished),
    'throughput', jsonb_build_object(
      'completed', coalesce((select sum(n) from per_minute), 0),
      'per_minute', round(coalesce((select sum(n) from per_minute), 0)::numeric / (p_window_hours * 60), 4),
      'busiest_minute', (select jsonb_build_object('minute', minute, 'completed', n)
                           from per_minute order by n desc, minute desc limit 1)),
    'attempts', (select jsonb_build_object(
      'ended', f.ended,
      'failed_by_class', coalesce(
        (select jsonb_object_agg(c.outcome_class, jsonb_build_object(
                  'count', c.n,
                  'rate', case when f.ended = 0 then null else round(c.n::numeric / f.ended, 4) end))
           from classes c),
        '{}'::jsonb))
      from attempt_figures f),
    'queue_wait_s', (select jsonb_build_object('p50', round(p[1]::numeric, 3), 'p95', round(p[2]::numeric, 3))
                       from waits),
    'processing_s', (select jsonb_build_object(
      'p50', round((percentile_cont(0.5) within group (order by seconds))::numeric, 3),
      'p95', round((percentile_cont(0.95) within group (order by seconds))::numeric, 3))
      from finished),
    'provider', (select jsonb_build_object(
      'calls', provider_calls,
      'p50_s', round(generate_p[1]::numeric, 3),
      'p95_s', round(generate_p[2]::numeric, 3),
      'errors', provider_errors,
      'error_rate', case when provider_calls = 0 then null
                         else round(provider_errors::numeric / provider_calls, 4) end)
      from attempt_figures),
    'storage', (select jsonb_build_object(
      'stored', stored,
      'failed', storage_failed,
      'success_rate', case when stored + storage_failed = 0 then null
                           else round(stored::numeric / (stored + storage_failed), 4) end,
      'upload_p95_s', round(upload_p95::numeric, 3))
      from attempt_figures),
    'retries', (select jsonb_build_object(
      'per_job', round(avg::numeric, 3), 'max', max, 'jobs_retried', retried) from retries),
    'stuck', jsonb_build_object(
      'expired_leases', (select count(*) from public.jobs
                          where status = 'processing' and lease_expires_at < now()),
      'pending_over_10_min', (select count(*) from public.jobs
                               where status in ('pending', 'queued')
                                 and created_at < now() - interval '10 minutes')),
    'recent_failures', coalesce(
      (select jsonb_agg(jsonb_build_object('id', id, 'failed_at', completed_at, 'attempts', attempts,
                                           'error', error_message) order by completed_at desc)
         from (select * from w where status = 'failed'
               order by completed_at desc nulls last limit 10) f),
      '[]'::jsonb)
  )
$$;

do $$
declare fn text;
begin
  foreach fn in array array[
    'public.complete_job(uuid, uuid, text, text, jsonb, jsonb)',
    'public.fail_job(uuid, uuid, text, boolean, integer, integer, integer, text, jsonb)',
    'public.job_stats(integer)']
  loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end $$;
