-- Sona: the earlier worker's jobs table, upgraded so that no row is left out.
-- Idempotent; valid on PostgreSQL 15 and newer.
--
-- The earlier table had a nullable created_at: a pending row with created_at null is never
-- dispatched by reclaim_jobs (its grace check compares created_at) and never counted by job_stats.
-- It could also carry its own updated_at trigger under another name (update_jobs_updated_at calling
-- update_updated_at_column(), or moddatetime's handle_updated_at): one such trigger is enough.

-- One updated_at trigger. Another owner's (the earlier worker's update_jobs_updated_at, the
-- plug-in's, moddatetime's handle_updated_at) is never dropped: where one exists, ours goes.
do $$ begin
  if exists (
    select from pg_trigger t
     where t.tgrelid = 'public.jobs'::regclass and not t.tgisinternal
       and t.tgname <> 'jobs_set_updated_at' and t.tgname ilike '%updated%at%'
       and (t.tgtype & 1) = 1 and (t.tgtype & 2) = 2 and (t.tgtype & 16) = 16) then
    drop trigger if exists jobs_set_updated_at on public.jobs;
  end if;
end $$;

-- A backfill that leaves updated_at as it was: every enabled updated_at trigger on jobs (ours or
-- another owner's) is held off for the one statement and enabled again, none dropped.
create or replace function public.sona_backfill_jobs(p_statement text) returns void
language plpgsql set search_path = '' as $$
declare
  v_triggers text[];
  v_name text;
begin
  select coalesce(array_agg(t.tgname), '{}') into v_triggers from pg_trigger t
   where t.tgrelid = 'public.jobs'::regclass and not t.tgisinternal and t.tgenabled <> 'D'
     and t.tgname ilike '%updated%at%';
  foreach v_name in array v_triggers loop
    execute format('alter table public.jobs disable trigger %I', v_name);
  end loop;
  execute p_statement;
  foreach v_name in array v_triggers loop
    execute format('alter table public.jobs enable trigger %I', v_name);
  end loop;
end $$;
revoke all on function public.sona_backfill_jobs(text) from public, anon, authenticated;

-- Backfill without touching updated_at (it is the best record of when the row was written).
do $$ begin
  if exists (select 1 from public.jobs where created_at is null) then
    perform public.sona_backfill_jobs(
      'update public.jobs set created_at = coalesce(updated_at, now()) where created_at is null');
  end if;
end $$;

alter table public.jobs
  alter column created_at set default now(),
  alter column created_at set not null;
