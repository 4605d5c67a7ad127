-- Sona: the generation id is the payment (issue 22). Idempotent; valid on PostgreSQL 15 and newer.
--
-- Stable Audio 3 answers a paid generation's id at once and the audio later. The id is written to
-- the row (fenced by the lease, like every other write) before the attempt waits for the audio, so
-- every later attempt (a retry, a reclaim after a crash or a deadline, a Storage failure after the
-- audio arrived) fetches it instead of paying again. Only an id the provider no longer knows
-- (404 generation_not_found) is forgotten, and each one forgotten is counted on the row.
--
-- Also: this project's own duration check (jobs_duration_check, made by 20261128000000 and widened
-- to the plug-in's 180 s by 20261202000100) takes stable-audio-3's 380 s. The plug-in's own check
-- (valid_duration, 1 to 180) is the plug-in's and stays: its rows never ask for more than 180 s.

alter table public.jobs
  add column if not exists generation_id text,
  add column if not exists generation_model text,
  add column if not exists generation_posted_at timestamptz,
  -- paid generations whose id expired before their audio was stored: each one was paid again
  add column if not exists generations_lost integer not null default 0;

do $$ begin
  if exists (select from pg_constraint where conrelid = 'public.jobs'::regclass
              and conname = 'jobs_duration_check'
              and pg_get_constraintdef(oid) not like '%380%') then
    alter table public.jobs drop constraint jobs_duration_check;
    alter table public.jobs add constraint jobs_duration_check check (duration between 1 and 380);
  end if;
end $$;

-- A signed-in user never writes the generation columns (the plug-in's own-update policy lets the
-- owner update their row): a forged id would make the worker fetch or forget what it names. Beside
-- jobs_guard, not inside it, so that function stays as 20261202000100 defines it.
create or replace function public.jobs_guard_generation() returns trigger
language plpgsql set search_path = '' as $$
begin
  if current_user not in ('anon', 'authenticated') then
    return new;
  end if;
  if (tg_op = 'INSERT' and (num_nonnulls(new.generation_id, new.generation_model, new.generation_posted_at) > 0
                            or new.generations_lost <> 0))
     or (tg_op = 'UPDATE'
         and (new.generation_id, new.generation_model, new.generation_posted_at, new.generations_lost)
             is distinct from
             (old.generation_id, old.generation_model, old.generation_posted_at, old.generations_lost)) then
    raise exception using errcode = '42501',
      message = 'A job''s generation is written by the worker, not by its owner.',
      hint = 'sona_results_protected';
  end if;
  return new;
end $$;
drop trigger if exists jobs_guard_generation on public.jobs;
create trigger jobs_guard_generation before insert or update on public.jobs
  for each row execute function public.jobs_guard_generation();

-- The id of the generation just paid for, on the row of the attempt that holds the lease. A row that
-- already names another id is left alone (the caller forgets the old one first); the same id again
-- is a no-op, so a retried write after a lost answer is safe. Answers the row, or nothing when stale.
create or replace function public.record_generation(
  p_job_id uuid, p_lease_token uuid, p_generation_id text, p_model text)
returns setof public.jobs
language sql volatile security invoker set search_path = '' as $$
  update public.jobs j
     set generation_id = p_generation_id,
         generation_model = p_model,
         generation_posted_at = coalesce(j.generation_posted_at, now())
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
     and (j.generation_id is null or j.generation_id = p_generation_id)
  returning j.*
$$;

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

do $$
declare fn text;
begin
  foreach fn in array array[
    'public.record_generation(uuid, uuid, text, text)',
    'public.forget_generation(uuid, uuid, text)',
    'public.generation_stats(integer)']
  loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end $$;
revoke all on function public.jobs_guard_generation() from public, anon;
grant execute on function public.jobs_guard_generation() to authenticated, service_role;
