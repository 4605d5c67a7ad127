-- Sona: job_stats() at full scale. A 24 h window can hold about 1,000,000 jobs (a day at the
-- queue's top rate), and the earlier job_stats() took 1.41 s over such a day (issue 21): it kept the
-- window's jobs and their attempts as materialized rows, read them again for each figure, and sorted
-- a million values for each of four percentiles, with the default work_mem spilling to disk.
--
-- This job_stats() answers the same JSON from two passes, each a hash aggregation over grouping sets
-- that only counts: the window's jobs (by status, by completed minute, by processing time, by first
-- attempt wait for jobs that ran once, by attempts) and the attempts that started in the window (by
-- provider time, by upload time, by class, by outcome). Percentiles are read off those counts
-- (sona_percentile, interpolated as percentile_cont does), so the times are exact to the
-- millisecond, the precision the figures are reported in. Differences from the earlier definition:
-- - attempt figures count the attempts that started in the window (without the join to the job's
--   creation, which was most of the time); an attempt starts after its job is created, so this
--   differs only for jobs created before the window whose attempts ran inside it;
-- - the first attempt's queue wait comes from jobs.started_at for jobs that ran once, and from
--   their attempt 1 (by the primary key) for the others.
-- Idempotent; valid on PostgreSQL 15 and newer.

-- p_fraction's percentile, interpolated as percentile_cont does, of the values p_values (ascending)
-- each seen p_counts times.
create or replace function public.sona_percentile(
  p_values double precision[], p_counts bigint[], p_fraction double precision)
returns double precision
language sql immutable parallel safe set search_path = '' as $$
  with v as (
    select u.value, sum(u.n) over (order by u.i) as upto  -- how many values are <= this one
      from unnest(p_values, p_counts) with ordinality as u(value, n, i)
  ), pos as (
    select p_fraction * (sum(n) - 1) as at from unnest(p_counts) as c(n)
  )
  select lo.value + (pos.at - floor(pos.at)) * (hi.value - lo.value)
    from pos,
         lateral (select v.value from v where v.upto > floor(pos.at) order by v.upto limit 1) lo,
         lateral (select v.value from v where v.upto > ceil(pos.at) order by v.upto limit 1) hi
$$;

create or replace function public.job_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker
set search_path = ''
set work_mem = '64MB'
set hash_mem_multiplier = 4
as $$
  with since as (
    select now() - make_interval(hours => p_window_hours) as t
  ), jobs_g as (
    -- one pass over the window's jobs: counts by status, completions by minute, processing times to
    -- the millisecond, and the totals
    select grouping(x.status) = 0 as by_status, grouping(x.minute) = 0 as by_minute,
           grouping(x.processing_ms) = 0 as by_processing, grouping(x.wait_ms) = 0 as by_wait,
           grouping(x.attempts) = 0 as by_attempts,
           x.status, x.minute, x.processing_ms, x.wait_ms, x.attempts, count(*) as n
      from (select j.status, j.attempts,
                   case when j.status = 'completed' then date_trunc('minute', j.completed_at) end as minute,
                   case when j.status = 'completed' and j.started_at is not null
                        then round(date_part('epoch', j.completed_at - j.started_at) * 1000) end as processing_ms,
                   -- a job that ran once started its first attempt at started_at
                   case when j.attempts = 1 and j.started_at is not null
                        then round(date_part('epoch', j.started_at - j.created_at) * 1000) end as wait_ms
              from public.jobs j, since where j.created_at >= since.t) x
     group by grouping sets ((x.status), (x.minute), (x.processing_ms), (x.wait_ms), (x.attempts))
  ), attempts_g as (
    -- one pass over their attempts: the provider and upload times, first attempts' queue waits (all to
    -- the millisecond), failures by class, and the totals
    select grouping(y.generate_ms) = 0 as by_generate, grouping(y.upload_ms) = 0 as by_upload,
           grouping(y.outcome_class) = 0 as by_class,
           y.generate_ms, y.upload_ms, y.outcome_class, y.ended, y.provider_error, count(*) as n
      from (select a.outcome is not null as ended, a.outcome_class,
                   (a.timings_ms ->> 'generate') is not null
                     and a.outcome_class in ('provider_permanent', 'provider_transient') as provider_error,
                   (a.timings_ms ->> 'generate')::double precision as generate_ms,
                   (a.timings_ms ->> 'upload')::double precision as upload_ms
              from public.job_attempts a, since where a.started_at >= since.t) y
     group by grouping sets ((y.generate_ms), (y.upload_ms), (y.outcome_class), (y.ended, y.provider_error))
  ), retried_waits as (
    -- the first attempt's wait of the jobs that ran more than once (about one in ten)
    select round(date_part('epoch', a.started_at - j.created_at) * 1000) as wait_ms, count(*) as n
      from public.jobs j cross join since
           cross join lateral (select f.started_at from public.job_attempts f
                                where f.job_id = j.id and f.attempt = 1 limit 1) a
     where j.created_at >= since.t and j.attempts > 1
     group by 1
  ), waits as (
    select wait_ms, sum(n)::bigint as n
      from (select wait_ms, n from jobs_g where by_wait and wait_ms is not null
            union all select wait_ms, n from retried_waits) w
     group by wait_ms
  ), dist as (
    -- each time figure as ascending values (seconds) and how often each was seen
    select 'processing' as figure, array_agg(processing_ms / 1000 order by processing_ms) as v, array_agg(n order by processing_ms) as c
      from jobs_g where by_processing and processing_ms is not null
    union all
    select 'generate', array_agg(generate_ms / 1000 order by generate_ms), array_agg(n order by generate_ms)
      from attempts_g where by_generate and generate_ms is not null
    union all
    select 'upload', array_agg(upload_ms / 1000 order by upload_ms), array_agg(n order by upload_ms)
      from attempts_g where by_upload and upload_ms is not null
    union all
    select 'wait', array_agg(wait_ms / 1000 order by wait_ms), array_agg(n order by wait_ms)
      from waits
  ), pct as (
    select d.figure,
           round(public.sona_percentile(d.v, d.c, 0.5)::numeric, 3) as p50,
           round(public.sona_percentile(d.v, d.c, 0.95)::numeric, 3) as p95,
           (select sum(x) from unnest(d.c) x) as seen
      from dist d where d.v is not null
  ), jt as (
    -- totals from the counts by attempts: every job is in exactly one
    select coalesce(sum(n), 0) as n,
           sum(n * (attempts - 1)) filter (where attempts > 0)::numeric
             / nullif(sum(n) filter (where attempts > 0), 0) as retries_avg,
           max(attempts - 1) filter (where attempts > 0) as retries_max,
           coalesce(sum(n) filter (where attempts > 1), 0) as retried,
           (select sum(processing_ms * n) / nullif(sum(n), 0) from jobs_g
             where by_processing and processing_ms is not null) as processing_avg_ms
      from jobs_g where by_attempts
  ), at as (
    select coalesce(sum(n) filter (where ended), 0) as ended,
           coalesce(sum(n) filter (where provider_error), 0) as provider_errors,
           (select coalesce(sum(n), 0) from attempts_g where by_class and outcome_class = 'storage') as storage_failed
      from attempts_g where not by_generate and not by_upload and not by_class
  ), per_minute as (
    select minute, n from jobs_g where by_minute and minute is not null
  ), ended as (
    select coalesce(sum(n) filter (where status = 'failed'), 0) as failed,
           coalesce(sum(n) filter (where status in ('completed', 'failed')), 0) as ended
      from jobs_g where by_status
  ), counts as (
    select (select seen from pct where figure = 'generate') as provider_calls,
           (select seen from pct where figure = 'upload') as stored
  )
  select jsonb_build_object(
    'window_hours', p_window_hours,
    'total', jt.n,
    'by_status', coalesce(
      (select jsonb_object_agg(status, n) from jobs_g where by_status), '{}'::jsonb),
    'failure_rate', case when e.ended = 0 then null else round(e.failed::numeric / e.ended, 4) end,
    'avg_processing_s', round((jt.processing_avg_ms / 1000)::numeric, 3),
    'p95_processing_s', (select p95 from pct where figure = 'processing'),
    'throughput', jsonb_build_object(
      'completed', coalesce((select sum(n) from per_minute), 0),
      'per_minute', round(coalesce((select sum(n) from per_minute), 0)::numeric / (p_window_hours * 60), 4),
      'busiest_minute', (select jsonb_build_object('minute', minute, 'completed', n)
                           from per_minute order by n desc, minute desc limit 1)),
    'attempts', jsonb_build_object(
      'ended', at.ended,
      'failed_by_class', coalesce(
        (select jsonb_object_agg(g.outcome_class, jsonb_build_object(
                  'count', g.n,
                  'rate', case when at.ended = 0 then null else round(g.n::numeric / at.ended, 4) end))
           from attempts_g g where g.by_class and g.outcome_class is not null),
        '{}'::jsonb)),
    'queue_wait_s', jsonb_build_object('p50', (select p50 from pct where figure = 'wait'),
                                       'p95', (select p95 from pct where figure = 'wait')),
    'processing_s', jsonb_build_object('p50', (select p50 from pct where figure = 'processing'),
                                       'p95', (select p95 from pct where figure = 'processing')),
    'provider', jsonb_build_object(
      'calls', coalesce(k.provider_calls, 0),
      'p50_s', (select p50 from pct where figure = 'generate'),
      'p95_s', (select p95 from pct where figure = 'generate'),
      'errors', at.provider_errors,
      'error_rate', case when coalesce(k.provider_calls, 0) = 0 then null
                         else round(at.provider_errors::numeric / k.provider_calls, 4) end),
    'storage', jsonb_build_object(
      'stored', coalesce(k.stored, 0),
      'failed', at.storage_failed,
      'success_rate', case when coalesce(k.stored, 0) + at.storage_failed = 0 then null
                           else round(k.stored::numeric / (k.stored + at.storage_failed), 4) end,
      'upload_p95_s', (select p95 from pct where figure = 'upload')),
    'retries', jsonb_build_object(
      'per_job', round(jt.retries_avg::numeric, 3), 'max', jt.retries_max, 'jobs_retried', jt.retried),
    'stuck', jsonb_build_object(
      'expired_leases', (select count(*) from public.jobs
                          where status = 'processing' and lease_expires_at < now()),
      'pending_over_10_min', (select count(*) from public.jobs
                               where status in ('pending', 'queued')
                                 and created_at < now() - interval '10 minutes')),
    'recent_failures', coalesce(
      (select jsonb_agg(jsonb_build_object('id', r.id, 'failed_at', r.completed_at, 'attempts', r.attempts,
                                           'error', r.error_message) order by r.completed_at desc)
         from (select j.id, j.completed_at, j.attempts, j.error_message
                 from public.jobs j, since
                where j.status = 'failed' and j.created_at >= since.t
                order by j.completed_at desc nulls last limit 10) r),
      '[]'::jsonb)
  )
  from jt, at, ended e, counts k
$$;

do $$
declare fn text;
begin
  foreach fn in array array[
    'public.sona_percentile(double precision[], bigint[], double precision)',
    'public.job_stats(integer)']
  loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end $$;
