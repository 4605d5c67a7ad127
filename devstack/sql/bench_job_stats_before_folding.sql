-- The benchmark's baseline: job_stats() as it was before settled hours were folded (the definition
-- of the pre-baseline migration 20261129001200_attempt_timings.sql, which counted every row of the
-- window on each call), under its own name. `python -m sona bench` creates it on the benchmark's
-- database, times it beside today's job_stats() on the same rows, and drops it. Never deployed.

create or replace function public.sona_bench_previous_job_stats(p_window_hours integer default 24)
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
