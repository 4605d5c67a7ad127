-- What an operator watches (`python -m sona stats`): job_stats(), spend_stats(), generation_stats()
-- (token_stats() sits with the tokens, 50_tokens.sql).
--
-- job_stats() at full scale: a 24 h window can hold about 1,000,000 jobs (a day at the queue's top
-- rate). Counting them each time costs seconds however it is written, so settled hours are counted
-- once:
-- - sona_job_groups(from, to) and sona_attempt_groups(from, to) count the jobs created, and the
--   attempts started, in [from, to): by status, completions by minute, processing times,
--   first-attempt queue waits and attempts; provider and upload times, failures by class, and the
--   ended / provider-error totals.
-- - sona_fold_job_stats() stores those counts for each settled hour (it ended over a few minutes ago,
--   every job created in it finished, every attempt started in it ended). reclaim_jobs' scheduled
--   call and `python -m sona stats` run it; an hour is folded once.
-- - job_stats() adds the folded hours inside its window to what it still counts from the rows: the
--   window's first, partial hour, the current hour, and any hour not folded (still running, or not
--   folded yet). Its answer is the same whether or not any hour is folded.
--
-- Percentiles are read off counts per value (sona_percentile, interpolated as percentile_cont
-- does), with times at four significant digits (to the millisecond below 10 s, to 10 ms up to
-- 100 s, to 100 ms above), so a folded hour holds a few thousand distinct values per figure rather
-- than one per job; the rows still counted are rounded the same way, after counting. Hours are UTC
-- hours whatever the session's time zone. A row deleted, inserted into a folded hour, or changed
-- after it finished unfolds its hour (counted from the rows again until folded again). Attempt
-- figures count the attempts that started in the window; the first attempt's queue wait comes from
-- jobs.started_at for jobs that ran once, and from their attempt 1 for the others.

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
revoke all on function public.sona_percentile(double precision[], bigint[], double precision) from public, anon, authenticated;
grant execute on function public.sona_percentile(double precision[], bigint[], double precision) to service_role;

-- A time in milliseconds at four significant digits (to_char's scientific notation; it reads its
-- argument once). Applied to the keys of counts, never to each row.
create or replace function public.sona_stats_round(p_ms double precision)
returns double precision
language sql stable parallel safe as $$
  select to_char(p_ms, '9.999EEEE')::double precision
$$;
revoke all on function public.sona_stats_round(double precision) from public, anon, authenticated;
grant execute on function public.sona_stats_round(double precision) to service_role;

-- The counts job_stats() reads of the jobs created in [p_from, p_to): by status, completions by
-- minute, processing times, first-attempt queue waits, and attempts. Each row says which grouping
-- it belongs to; a key may come twice (the waits of jobs that ran once and of the others).
create or replace function public.sona_job_groups(p_from timestamptz, p_to timestamptz)
returns table (by_status boolean, by_minute boolean, by_processing boolean, by_wait boolean,
               by_attempts boolean, status text, minute timestamptz, processing_ms double precision,
               wait_ms double precision, attempts integer, n bigint)
language sql stable set search_path = '' as $$
  select grouping(x.status) = 0, grouping(x.minute) = 0, grouping(x.processing_ms) = 0,
         grouping(x.wait_ms) = 0, grouping(x.attempts) = 0,
         x.status, x.minute, x.processing_ms, x.wait_ms, x.attempts, count(*)
    from (select j.status, j.attempts,
                 case when j.status = 'completed' then date_trunc('minute', j.completed_at) end as minute,
                 case when j.status = 'completed' and j.started_at is not null
                      then round(date_part('epoch', j.completed_at - j.started_at) * 1000) end as processing_ms,
                 -- a job that ran once started its first attempt at started_at
                 case when j.attempts = 1 and j.started_at is not null
                      then round(date_part('epoch', j.started_at - j.created_at) * 1000) end as wait_ms
            from public.jobs j where j.created_at >= p_from and j.created_at < p_to) x
   group by grouping sets ((x.status), (x.minute), (x.processing_ms), (x.wait_ms), (x.attempts))
  union all
  -- the first attempt's wait of the jobs that ran more than once (about one in ten)
  select false, false, false, true, false, null, null, null, w.wait_ms, null, count(*)
    from (select round(date_part('epoch', a.started_at - j.created_at) * 1000) as wait_ms
            from public.jobs j
            cross join lateral (select f.started_at from public.job_attempts f
                                 where f.job_id = j.id and f.attempt = 1 limit 1) a
           where j.created_at >= p_from and j.created_at < p_to and j.attempts > 1) w
   group by w.wait_ms
$$;
revoke all on function public.sona_job_groups(timestamptz, timestamptz) from public, anon, authenticated;
grant execute on function public.sona_job_groups(timestamptz, timestamptz) to service_role;

-- The counts job_stats() reads of the attempts started in [p_from, p_to): provider and upload
-- times, failures by class, and the ended / provider-error totals.
create or replace function public.sona_attempt_groups(p_from timestamptz, p_to timestamptz)
returns table (by_generate boolean, by_upload boolean, by_class boolean, generate_ms double precision,
               upload_ms double precision, outcome_class text, ended boolean, provider_error boolean,
               n bigint)
language sql stable set search_path = '' as $$
  select grouping(y.generate_ms) = 0, grouping(y.upload_ms) = 0, grouping(y.outcome_class) = 0,
         y.generate_ms, y.upload_ms, y.outcome_class, y.ended, y.provider_error, count(*)
    from (select a.outcome is not null as ended, a.outcome_class,
                 (a.timings_ms ->> 'generate') is not null
                   and a.outcome_class in ('provider_permanent', 'provider_transient') as provider_error,
                 (a.timings_ms ->> 'generate')::double precision as generate_ms,
                 (a.timings_ms ->> 'upload')::double precision as upload_ms
            from public.job_attempts a where a.started_at >= p_from and a.started_at < p_to) y
   group by grouping sets ((y.generate_ms), (y.upload_ms), (y.outcome_class), (y.ended, y.provider_error))
$$;
revoke all on function public.sona_attempt_groups(timestamptz, timestamptz) from public, anon, authenticated;
grant execute on function public.sona_attempt_groups(timestamptz, timestamptz) to service_role;

-- The folded hours and their counts.
create table public.sona_stats_hours (
  hour timestamptz primary key,
  folded_at timestamptz not null default now()
);
create table public.sona_stats_job_groups (
  hour timestamptz not null references public.sona_stats_hours (hour) on delete cascade,
  by_status boolean not null, by_minute boolean not null, by_processing boolean not null,
  by_wait boolean not null, by_attempts boolean not null,
  status text, minute timestamptz, processing_ms double precision, wait_ms double precision,
  attempts integer, n bigint not null
);
create index sona_stats_job_groups_hour_idx on public.sona_stats_job_groups (hour);
create table public.sona_stats_attempt_groups (
  hour timestamptz not null references public.sona_stats_hours (hour) on delete cascade,
  by_generate boolean not null, by_upload boolean not null, by_class boolean not null,
  generate_ms double precision, upload_ms double precision, outcome_class text,
  ended boolean, provider_error boolean, n bigint not null
);
create index sona_stats_attempt_groups_hour_idx on public.sona_stats_attempt_groups (hour);
alter table public.sona_stats_hours enable row level security;
alter table public.sona_stats_job_groups enable row level security;
alter table public.sona_stats_attempt_groups enable row level security;
revoke all on public.sona_stats_hours, public.sona_stats_job_groups, public.sona_stats_attempt_groups
  from public, anon, authenticated;
grant all on public.sona_stats_hours, public.sona_stats_job_groups, public.sona_stats_attempt_groups
  to service_role;

-- Fold up to p_limit settled hours of the last 35 days (the newest first; an hour, in UTC whatever
-- the session's time zone, is settled once it ended over 5 minutes ago, a margin for transactions
-- still committing rows stamped inside it, with every job created in it finished and every attempt
-- started in it ended), drop folds older than that, and answer how many hours were folded. One
-- caller at a time: a second returns 0 at once.
create or replace function public.sona_fold_job_stats(p_limit integer default 48)
returns integer
language plpgsql security definer set search_path = '' as $$
declare
  v_hour timestamptz;
  v_folded integer := 0;
begin
  if not pg_try_advisory_xact_lock(hashtext('sona_fold_job_stats')) then
    return 0;
  end if;
  delete from public.sona_stats_hours where hour < date_trunc('hour', now() - interval '35 days', 'UTC');
  -- Every hour of the period is a candidate (an hour without jobs folds to nothing): each check
  -- below is an index probe, never a scan of the period's rows.
  for v_hour in
    select h.hour
      from generate_series(date_trunc('hour', now() - interval '35 days', 'UTC'),
                           now() - interval '1 hour 5 minutes', interval '1 hour') as h(hour)
     where not exists (select 1 from public.sona_stats_hours s where s.hour = h.hour)
       and not exists (select 1 from public.jobs j
                        where j.status in ('pending', 'queued', 'processing')
                          and j.created_at >= h.hour and j.created_at < h.hour + interval '1 hour')
       and not exists (select 1 from public.job_attempts a
                        where a.outcome is null
                          and a.started_at >= h.hour and a.started_at < h.hour + interval '1 hour')
     order by h.hour desc  -- the newest first: a short window is fast from the first call
     limit p_limit
  loop
    insert into public.sona_stats_hours (hour) values (v_hour);
    insert into public.sona_stats_job_groups
      select v_hour, g.by_status, g.by_minute, g.by_processing, g.by_wait, g.by_attempts, g.status,
             g.minute, public.sona_stats_round(g.processing_ms), public.sona_stats_round(g.wait_ms),
             g.attempts, sum(g.n)
        from public.sona_job_groups(v_hour, v_hour + interval '1 hour') g
       group by 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11;
    insert into public.sona_stats_attempt_groups
      select v_hour, g.by_generate, g.by_upload, g.by_class, public.sona_stats_round(g.generate_ms),
             public.sona_stats_round(g.upload_ms), g.outcome_class, g.ended, g.provider_error, sum(g.n)
        from public.sona_attempt_groups(v_hour, v_hour + interval '1 hour') g
       group by 1, 2, 3, 4, 5, 6, 7, 8, 9;
    v_folded := v_folded + 1;
  end loop;
  return v_folded;
end $$;
revoke all on function public.sona_fold_job_stats(integer) from public, anon, authenticated;
grant execute on function public.sona_fold_job_stats(integer) to service_role;

-- Rows that change a folded hour unfold it, so job_stats() never counts a row that is gone or has
-- moved: a deleted job or attempt, a finished job or ended attempt changed afterwards (a pause's
-- release, which reopens an attempt), and a row inserted with a time inside a folded hour; emptying
-- either table unfolds every hour. Each waits for a fold in progress first (the fold's lock), so a
-- fold cannot commit counts that still include the row. The time column is the trigger's argument.
create or replace function public.sona_stats_unfold_hours(p_hours timestamptz[])
returns void language plpgsql security definer set search_path = '' as $$
begin
  perform pg_advisory_xact_lock(hashtext('sona_fold_job_stats'));
  delete from public.sona_stats_hours where hour = any (p_hours);
end $$;
revoke all on function public.sona_stats_unfold_hours(timestamptz[]) from public, anon, authenticated;
grant execute on function public.sona_stats_unfold_hours(timestamptz[]) to service_role;

-- For a statement's deleted or inserted rows (the transition table "touched"). An insert, on the
-- hot path, looks before it locks: its rows are nearly always in the current hour, never folded.
create or replace function public.sona_stats_unfold()
returns trigger language plpgsql security definer set search_path = '' as $$
declare
  v_hours timestamptz[];
begin
  execute format('select array_agg(distinct date_trunc(''hour'', t.%I, ''UTC'')) from touched t', tg_argv[0])
    into v_hours;
  if tg_op = 'DELETE'
     or exists (select 1 from public.sona_stats_hours s where s.hour = any (v_hours)) then
    perform public.sona_stats_unfold_hours(v_hours);
  end if;
  return null;
end $$;
revoke all on function public.sona_stats_unfold() from public, anon, authenticated;
grant execute on function public.sona_stats_unfold() to service_role;
create trigger sona_stats_unfold after delete on public.jobs
  referencing old table as touched for each statement execute function public.sona_stats_unfold('created_at');
create trigger sona_stats_unfold after delete on public.job_attempts
  referencing old table as touched for each statement execute function public.sona_stats_unfold('started_at');
create trigger sona_stats_unfold_inserted after insert on public.jobs
  referencing new table as touched for each statement execute function public.sona_stats_unfold('created_at');
create trigger sona_stats_unfold_inserted after insert on public.job_attempts
  referencing new table as touched for each statement execute function public.sona_stats_unfold('started_at');

-- For one finished row changed afterwards (the triggers' conditions pick them out): the hour it
-- was in and the hour it is in now.
create or replace function public.sona_stats_unfold_row()
returns trigger language plpgsql security definer set search_path = '' as $$
declare
  v_hours timestamptz[];
begin
  execute format('select array[date_trunc(''hour'', ($1).%1$I, ''UTC''), date_trunc(''hour'', ($2).%1$I, ''UTC'')]',
                 tg_argv[0])
    into v_hours using old, new;
  perform public.sona_stats_unfold_hours(v_hours);
  return null;
end $$;
revoke all on function public.sona_stats_unfold_row() from public, anon, authenticated;
grant execute on function public.sona_stats_unfold_row() to service_role;
create trigger sona_stats_unfold_changed
  after update of status, attempts, created_at, started_at, completed_at on public.jobs
  for each row when (old.status in ('completed', 'failed', 'cancelled'))
  execute function public.sona_stats_unfold_row('created_at');
create trigger sona_stats_unfold_changed
  after update of started_at, outcome, outcome_class, timings_ms on public.job_attempts
  for each row when (old.outcome is not null)
  execute function public.sona_stats_unfold_row('started_at');

-- Emptying either table unfolds every hour.
create or replace function public.sona_stats_unfold_all()
returns trigger language plpgsql security definer set search_path = '' as $$
begin
  delete from public.sona_stats_hours;
  return null;
end $$;
revoke all on function public.sona_stats_unfold_all() from public, anon, authenticated;
grant execute on function public.sona_stats_unfold_all() to service_role;
create trigger sona_stats_unfold_all after truncate on public.jobs
  for each statement execute function public.sona_stats_unfold_all();
create trigger sona_stats_unfold_all after truncate on public.job_attempts
  for each statement execute function public.sona_stats_unfold_all();

-- Every figure an operator watches, for the jobs created in the window (and their attempts):
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
language sql stable security invoker
set search_path = ''
set work_mem = '64MB'
set hash_mem_multiplier = 4
as $$
  with since as (
    select now() - make_interval(hours => p_window_hours) as t
  ), hours as (
    -- each hour the window touches, and whether its counts are folded (only whole hours inside it)
    select h.hour,
           h.hour >= s.t and h.hour + interval '1 hour' <= now()
             and exists (select 1 from public.sona_stats_hours f where f.hour = h.hour) as folded
      from since s, generate_series(date_trunc('hour', s.t, 'UTC'), now(), interval '1 hour') as h(hour)
  ), raw_ranges as (
    -- the rest, as ranges of consecutive hours cut to the window (the last one open-ended)
    select greatest(min(r.hour), s.t) as lo,
           case when max(r.hour) = date_trunc('hour', now(), 'UTC') then 'infinity'::timestamptz
                else max(r.hour) + interval '1 hour' end as hi
      from (select hour, hour - (row_number() over (order by hour)) * interval '1 hour' as island
              from hours where not folded) r, since s
     group by r.island, s.t
  ), folded as (
    select hour from hours where folded
  ), jobs_g as (
    select by_status, by_minute, by_processing, by_wait, by_attempts, status, minute,
           public.sona_stats_round(processing_ms) as processing_ms,
           public.sona_stats_round(wait_ms) as wait_ms, attempts, sum(n)::bigint as n
      from (select g.* from raw_ranges r cross join lateral public.sona_job_groups(r.lo, r.hi) g
            union all
            select f.by_status, f.by_minute, f.by_processing, f.by_wait, f.by_attempts,
                   f.status, f.minute, f.processing_ms, f.wait_ms, f.attempts, f.n
              from public.sona_stats_job_groups f join folded using (hour)) u
     group by 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
  ), attempts_g as (
    select by_generate, by_upload, by_class, public.sona_stats_round(generate_ms) as generate_ms,
           public.sona_stats_round(upload_ms) as upload_ms, outcome_class, ended, provider_error,
           sum(n)::bigint as n
      from (select g.* from raw_ranges r cross join lateral public.sona_attempt_groups(r.lo, r.hi) g
            union all
            select f.by_generate, f.by_upload, f.by_class, f.generate_ms, f.upload_ms,
                   f.outcome_class, f.ended, f.provider_error, f.n
              from public.sona_stats_attempt_groups f join folded using (hour)) u
     group by 1, 2, 3, 4, 5, 6, 7, 8
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
      from jobs_g where by_wait and wait_ms is not null
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
revoke all on function public.job_stats(integer) from public, anon, authenticated;
grant execute on function public.job_stats(integer) to service_role;

-- The pause, quota refusals (counted since the sequences were made: a refused insert leaves no row)
-- and cancellations.
create or replace function public.spend_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker set search_path = '' as $$
  select jsonb_build_object(
    'pause', (select jsonb_build_object('code', p.code, 'reason', p.reason, 'since', p.since,
                                        'until', p.until, 'probe_job', p.probe_job,
                                        'jobs_released', p.jobs_released)
                from public.sona_pauses p where p.lifted_at is null),
    'pauses_in_window', (select count(*) from public.sona_pauses p
                          where p.since >= now() - make_interval(hours => p_window_hours)),
    'jobs_released_by_outages', (select coalesce(sum(p.jobs_released), 0) from public.sona_pauses p
                                  where p.since >= now() - make_interval(hours => p_window_hours)),
    'cancelled', (select count(*) from public.jobs j
                   where j.cancelled_at >= now() - make_interval(hours => p_window_hours)),
    'quota', jsonb_build_object(
      'max_active_jobs', public.sona_setting('max_active_jobs'),
      'max_jobs_per_day', public.sona_setting('max_jobs_per_day'),
      -- counted since the migration (a refused insert leaves no row to count)
      'refused_active_total', (select case when s.is_called then s.last_value else 0 end
                                 from public.sona_refused_active_seq s),
      'refused_daily_total', (select case when s.is_called then s.last_value else 0 end
                                from public.sona_refused_daily_seq s))
  )
$$;
revoke all on function public.spend_stats(integer) from public, anon, authenticated;
grant execute on function public.spend_stats(integer) to service_role;

-- Paid generations per model in the window, for `stats` to price (the credits are a setting):
-- a completed job's audio names its model; every forgotten id was one more paid generation.
create or replace function public.generation_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker set search_path = '' as $$
  select coalesce(jsonb_object_agg(m.model, jsonb_build_object('completed', m.completed, 'lost', m.lost)),
                  '{}'::jsonb)
    from (select coalesce(j.audio ->> 'model', j.generation_model) as model,
                 count(*) filter (where j.status = 'completed') as completed,
                 coalesce(sum(j.generations_lost), 0) as lost
            from public.jobs j
           where j.created_at >= now() - make_interval(hours => p_window_hours)
             and (j.status = 'completed' or j.generations_lost > 0)
             and coalesce(j.audio ->> 'model', j.generation_model) is not null
           group by 1) m
$$;
revoke all on function public.generation_stats(integer) from public, anon, authenticated;
grant execute on function public.generation_stats(integer) to service_role;
