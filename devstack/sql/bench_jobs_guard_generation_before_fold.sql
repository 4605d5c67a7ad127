-- The benchmark's "before": the generation columns' guard as a trigger of its own, as the
-- pre-baseline migration 20261202004000_generation_ids.sql made it beside jobs_guard (issue 30
-- folded it into jobs_guard). `python -m devstack bench --only triggers` adds it to measure the hot
-- path as it was, then drops it. Never deployed.

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
