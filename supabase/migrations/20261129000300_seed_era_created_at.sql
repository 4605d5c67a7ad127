-- Sona: the earlier worker's jobs table, upgraded so that no row is left out.
-- Idempotent; valid on PostgreSQL 15 and newer.
--
-- The earlier table had a nullable created_at: a pending row with created_at null is never
-- dispatched by reclaim_jobs (its grace check compares created_at) and never counted by job_stats.
-- It could also carry its own updated_at trigger under another name (update_jobs_updated_at calling
-- update_updated_at_column(), or moddatetime's handle_updated_at): with ours, two triggers write
-- the same column on every update.

-- One updated_at trigger: ours (jobs_set_updated_at). Other row-level BEFORE UPDATE triggers on jobs
-- named for updated_at are the earlier worker's; their functions stay, other tables may use them.
do $$
declare trg record;
begin
  for trg in
    select t.tgname from pg_trigger t
     where t.tgrelid = 'public.jobs'::regclass
       and not t.tgisinternal
       and t.tgname <> 'jobs_set_updated_at'
       and t.tgname ilike '%updated%at%'
       and (t.tgtype & 1) = 1   -- FOR EACH ROW
       and (t.tgtype & 2) = 2   -- BEFORE
       and (t.tgtype & 16) = 16 -- UPDATE
  loop
    execute format('drop trigger %I on public.jobs', trg.tgname);
  end loop;
end $$;

-- Backfill without touching updated_at (it is the best record of when the row was written).
do $$ begin
  if exists (select 1 from public.jobs where created_at is null) then
    alter table public.jobs disable trigger jobs_set_updated_at;
    update public.jobs set created_at = coalesce(updated_at, now()) where created_at is null;
    alter table public.jobs enable trigger jobs_set_updated_at;
  end if;
end $$;

alter table public.jobs
  alter column created_at set default now(),
  alter column created_at set not null;
