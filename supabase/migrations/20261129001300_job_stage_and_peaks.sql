-- Sona: what the plug-in shows while a job runs and after it ends. Idempotent; valid on PostgreSQL
-- 15 and newer. Adds, and redefines nothing:
--
-- 1. jobs.stage: queued -> claimed -> generating -> encoding -> uploading -> done (or failed,
--    cancelled). A BEFORE trigger derives it from every status transition, so the state functions
--    need no change; advance_stage() writes the three stages inside an attempt, fenced by the lease
--    like every other write. Each is its own committed UPDATE, so Supabase Realtime pushes each.
-- 2. jobs.peaks_url: the waveform peaks file's URL. complete_job already writes the `audio` info in
--    the statement that completes the row, so the URL travels inside it (no extra round trip, the
--    same fence, and a retry that reuses stored files gets it from the MP3's metadata) and the same
--    trigger copies it to a plain column. Not a generated column: logical replication, which feeds
--    Realtime, publishes generated columns only from PostgreSQL 18, and Supabase runs 15 and 17.

alter table public.jobs
  add column if not exists stage text not null default 'queued',
  add column if not exists peaks_url text;

do $$ begin
  if not exists (select from pg_constraint where conname = 'jobs_stage_check'
                  and conrelid = 'public.jobs'::regclass) then
    alter table public.jobs add constraint jobs_stage_check check (stage in (
      'queued', 'claimed', 'generating', 'encoding', 'uploading', 'done', 'failed', 'cancelled'));
  end if;
end $$;

-- The order of the stages an attempt moves through; null for the others.
create or replace function public.sona_stage_rank(p_stage text)
returns integer language sql immutable set search_path = '' as $$
  select case p_stage when 'claimed' then 1 when 'generating' then 2
                      when 'encoding' then 3 when 'uploading' then 4 end
$$;

-- The stage a status implies (processing starts at claimed).
create or replace function public.sona_stage_of(p_status text)
returns text language sql immutable set search_path = '' as $$
  select case p_status when 'pending' then 'queued' when 'queued' then 'queued'
                       when 'processing' then 'claimed' when 'completed' then 'done'
                       when 'failed' then 'failed' when 'cancelled' then 'cancelled' end
$$;

-- Stage and peaks_url follow the row, whoever writes it: a new status (or a new lease, which is a
-- new attempt) sets the stage; within one attempt only a forward stage of that attempt is kept.
create or replace function public.jobs_derive_stage() returns trigger
language plpgsql set search_path = '' as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status
     or new.lease_token is distinct from old.lease_token
     or new.status <> 'processing' then
    new.stage := coalesce(public.sona_stage_of(new.status), new.stage);
  elsif public.sona_stage_rank(new.stage) is null then
    new.stage := old.stage;
  end if;
  new.peaks_url := new.audio ->> 'peaks_url';
  return new;
end $$;

drop trigger if exists jobs_derive_stage on public.jobs;
create trigger jobs_derive_stage before insert or update on public.jobs
  for each row execute function public.jobs_derive_stage();

-- Rows from before this migration: their stage and URL from what they already say; nothing else of
-- the row changes, updated_at included (sona_backfill_jobs, 20261129000300).
select public.sona_backfill_jobs($sql$
  update public.jobs j
     set stage = coalesce(public.sona_stage_of(j.status), j.stage)
   where j.stage is distinct from coalesce(public.sona_stage_of(j.status), j.stage)
      or j.peaks_url is distinct from j.audio ->> 'peaks_url'
$sql$);

-- advance_stage: fenced like complete_job; zero rows means a stale worker (its lease was reclaimed)
-- or a stage behind the row's, and nothing is written. Repeating the current stage matches, so a
-- retry after a lost answer is not mistaken for a stale lease.
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
end $$;

-- Only the service role may move a stage. The two helpers stay callable by everyone: the trigger
-- calls them on behalf of whoever writes the row (a user inserting a job, too).
revoke all on function public.advance_stage(uuid, uuid, text) from public, anon, authenticated;
grant execute on function public.advance_stage(uuid, uuid, text) to service_role;
