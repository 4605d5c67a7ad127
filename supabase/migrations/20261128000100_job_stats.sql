-- Sona: the monitoring figures an operator watches, as one function (python -m sona stats).
create or replace function public.job_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker set search_path = '' as $$
  with w as (
    select * from public.jobs where created_at >= now() - make_interval(hours => p_window_hours)
  ), finished as (
    select extract(epoch from completed_at - started_at)::double precision as seconds
      from w where status = 'completed' and started_at is not null
  ), ended as (
    select count(*) filter (where status = 'failed') as failed,
           count(*) filter (where status in ('completed', 'failed')) as ended
      from w
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

revoke all on function public.job_stats(integer) from public, anon, authenticated;
grant execute on function public.job_stats(integer) to service_role;
