-- A job that gives the musician nothing gives their tokens back.
--
-- The real plug-in charges before the job exists: its `generate` Edge Function calls use_tokens (a
-- 'usage' row in token_transactions, the balance in user_tokens lowered) and then inserts the job
-- with the service role. Nothing of the charge is written on the job. So:
--
-- 1. The charge belongs to its job (public.sona_job_charges, one row per job the service role inserts
--    while the plug-in's token tables exist; a user's own insert is refused there, issue 29). At
--    insert, under the user's lock, the job takes the same user's newest 'usage' transaction not yet
--    taken by another job whose description is exactly what generate writes for this row (tier,
--    duration, quality as sent, the prompt's first 30 characters) and which was written at most
--    sona_charge_window() before the insert, on the server's clock (never the row's created_at). Two jobs of
--    different prices have different descriptions, so they cannot swap charges; two identical
--    requests cost the same, so which of the two charges each takes does not matter. A job whose
--    charge is not found keeps a row with no transaction: it is refunded nothing, logged and counted
--    (sona token_stats), never guessed.
-- 2. Settlement, once, in the transaction of the job's final write, by the worker's own records
--    (sona_provider_spend: job_attempts, which no user reaches): failed with no paid call on record,
--    or cancelled before any call was made -> one 'refund' transaction naming the job and the
--    balance raised by what was charged; completed, failed after a paid call, or cancelled once a
--    call was made -> the tokens are kept (a user marking their own job failed counts as a cancel).
--    A row lock on the charge makes concurrent finishes settle once.
-- 3. Quotas on the service-role path (generate's): a charged job over the user's quota is not
--    refused (its tokens are already spent) but inserted `failed` with the quota's message, and
--    refunded at once. Service-role inserts with no charge (the worker, an operator) stay exempt.
-- 4. token_stats(): tokens charged and refunded, and jobs whose charge was not found, in a window.
-- On a database without the plug-in's token tables the triggers return at once: nothing changes.

create table public.sona_job_charges (
  -- deferred: the link is written by the BEFORE INSERT trigger, before its job row exists
  job_id uuid primary key references public.jobs (id) on delete cascade deferrable initially deferred,
  user_id uuid not null,
  -- null: no charge was found for this job (it will be refunded nothing)
  transaction_id uuid unique,
  tokens integer check (tokens > 0),
  -- what generate would have written for this job: the charge looked for
  description text,
  linked_at timestamptz not null default now(),
  settled_at timestamptz,
  settlement text check (settlement in ('refunded', 'kept', 'refund_failed')),
  refund_transaction_id uuid unique,
  note text,
  check ((transaction_id is null) = (tokens is null)),
  check ((settled_at is null) = (settlement is null))
);
create index sona_job_charges_linked_at_idx on public.sona_job_charges (linked_at);
create index sona_job_charges_settled_at_idx on public.sona_job_charges (settled_at)
  where settled_at is not null;
alter table public.sona_job_charges enable row level security;
revoke all on public.sona_job_charges from public, anon, authenticated;
grant all on public.sona_job_charges to service_role;

-- How long before its job a charge may have been written (generate charges, then inserts, in one
-- request: seconds apart; a longer gap is another request's charge).
create or replace function public.sona_charge_window() returns interval
language sql immutable set search_path = '' as $$ select interval '5 minutes' $$;

-- generate's wording of a charge (supabase/functions/generate/index.ts): `Tier (duration, quality):
-- "prompt"`, the duration as Ns, Mm or Mm Ss, the prompt cut to 30 characters plus '...'. Null for
-- a mode generate does not price. (JavaScript counts UTF-16 units where this counts characters: a
-- prompt with characters outside the Basic Multilingual Plane in its first 30 may not match.)
create or replace function public.sona_charge_description(
  p_mode text, p_duration integer, p_quality text, p_prompt text)
returns text
language sql immutable set search_path = '' as $$
  select case when p_mode in ('designer', 'producer', 'creator') then
    format('%s (%s, %s): "%s"',
           upper(left(p_mode, 1)) || substr(p_mode, 2),
           case when p_duration < 60 then p_duration || 's'
                when p_duration % 60 = 0 then (p_duration / 60) || 'm'
                else (p_duration / 60) || 'm ' || (p_duration % 60) || 's' end,
           p_quality,
           case when char_length(p_prompt) > 30 then left(p_prompt, 30) || '...' else p_prompt end)
  end
$$;

-- Are the plug-in's token tables here? (Looked up each time: they may arrive after this schema.)
create or replace function public.sona_tokens_present() returns boolean
language sql stable set search_path = '' as $$
  select to_regclass('public.token_transactions') is not null and to_regclass('public.user_tokens') is not null
$$;

-- The charge generate made for this job: the user's newest usage transaction with the job's
-- description, in the window before the job, that no other job has taken. Caller holds the user's
-- lock. Dynamic SQL: the token tables need not exist when this function is created.
create or replace function public.sona_find_charge(
  p_user_id uuid, p_description text, p_created_at timestamptz)
returns table (transaction_id uuid, tokens integer)
language plpgsql stable security definer set search_path = '' as $$
begin
  if p_description is null then
    return;
  end if;
  return query execute
    'select t.id, -t.amount
       from public.token_transactions t
      where t.user_id = $1 and t.type = ''usage'' and t.amount < 0 and t.description = $2
        and t.created_at <= $3 and t.created_at >= $3 - public.sona_charge_window()
        and t.created_at <= now() and t.created_at >= now() - public.sona_charge_window()
        and not exists (select from public.sona_job_charges c where c.transaction_id = t.id)
      order by t.created_at desc, t.id
      limit 1'
    using p_user_id, p_description, p_created_at;
end $$;
revoke all on function public.sona_find_charge(uuid, text, timestamptz) from public, anon, authenticated;
grant execute on function public.sona_find_charge(uuid, text, timestamptz) to service_role;

-- Write the link (found or not) and log a job whose charge is missing. Answers the tokens linked.
create or replace function public.sona_link_charge(
  p_job_id uuid, p_user_id uuid, p_mode text, p_duration integer, p_quality text, p_prompt text,
  p_created_at timestamptz)
returns integer
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_description text := public.sona_charge_description(p_mode, p_duration, p_quality, p_prompt);
  v_charge record;
begin
  select * into v_charge from public.sona_find_charge(p_user_id, v_description, p_created_at);
  insert into public.sona_job_charges (job_id, user_id, transaction_id, tokens, description)
  values (p_job_id, p_user_id, v_charge.transaction_id, v_charge.tokens, v_description)
  on conflict (job_id) do nothing;
  if v_charge.transaction_id is null then
    raise log 'sona: no token charge found for job % (user %, looked for %)', p_job_id, p_user_id,
      coalesce(v_description, 'a priced mode');
  end if;
  return v_charge.tokens;
end $$;
revoke all on function public.sona_link_charge(uuid, uuid, text, integer, text, text, timestamptz) from public, anon, authenticated;
grant execute on function public.sona_link_charge(uuid, uuid, text, integer, text, text, timestamptz) to service_role;

-- Settle the job's charge once: refund it, or keep it. The row lock on the link serialises
-- concurrent finishes; the second finds it settled and does nothing. An error while refunding never
-- undoes the job's own write: the charge is marked refund_failed (counted by token_stats) instead.
create or replace function public.sona_settle_charge(p_job_id uuid, p_refund boolean, p_reason text)
returns void
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_link public.sona_job_charges;
  v_refund_id uuid;
begin
  select * into v_link from public.sona_job_charges c
   where c.job_id = p_job_id and c.settled_at is null
   for update;
  if not found then
    return;  -- no link (inserted before this migration), or settled already
  end if;
  if v_link.transaction_id is null then
    update public.sona_job_charges set settled_at = now(), settlement = 'kept', note = 'no charge found'
     where job_id = p_job_id;
    if p_refund then
      raise log 'sona: job % ended without audio but its charge was never found: nothing refunded', p_job_id;
    end if;
    return;
  end if;
  if not p_refund then
    update public.sona_job_charges set settled_at = now(), settlement = 'kept', note = p_reason
     where job_id = p_job_id;
    return;
  end if;
  begin
    execute 'insert into public.token_transactions (user_id, amount, type, description)
             values ($1, $2, ''refund'', $3) returning id'
      into v_refund_id
      using v_link.user_id, v_link.tokens,
            format('Refund for job %s (%s): %s', p_job_id, p_reason, v_link.description);
    execute 'insert into public.user_tokens as u (user_id, balance) values ($1, $2)
             on conflict (user_id) do update
               set balance = u.balance + excluded.balance,
                   lifetime_used = greatest(0, u.lifetime_used - excluded.balance),
                   updated_at = now()'
      using v_link.user_id, v_link.tokens;
    update public.sona_job_charges
       set settled_at = now(), settlement = 'refunded', refund_transaction_id = v_refund_id, note = p_reason
     where job_id = p_job_id;
  exception when others then
    update public.sona_job_charges
       set settled_at = now(), settlement = 'refund_failed', note = sqlstate || ': ' || sqlerrm
     where job_id = p_job_id;
    raise warning 'sona: refund of job % failed: % %', p_job_id, sqlstate, sqlerrm;
  end;
end $$;
revoke all on function public.sona_settle_charge(uuid, boolean, text) from public, anon, authenticated;
grant execute on function public.sona_settle_charge(uuid, boolean, text) to service_role;

-- What the worker's records say was spent on a job (job_attempts, which no user reaches): 'paid' (a
-- call came back paid, or a generation id was ever held), 'called' (a call was made, its outcome
-- unknown), or 'none'. A refund follows it, never the stage a row says it reached.
create or replace function public.sona_provider_spend(p_job_id uuid) returns text
language sql stable security definer set search_path = '' as $$
  select case
    when exists (select from public.job_attempts a where a.job_id = p_job_id and a.provider_paid_at is not null)
      or exists (select from public.jobs j where j.id = p_job_id
                   and (j.generation_id is not null or j.generations_lost > 0)) then 'paid'
    when exists (select from public.job_attempts a where a.job_id = p_job_id and a.provider_called_at is not null)
      then 'called'
    else 'none' end
$$;
revoke all on function public.sona_provider_spend(uuid) from public, anon, authenticated;
grant execute on function public.sona_provider_spend(uuid) to service_role;

-- The job's final write settles its charge.
create or replace function public.jobs_settle_charge() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_spend text;
begin
  if not public.sona_tokens_present() then
    return null;
  end if;
  v_spend := public.sona_provider_spend(new.id);
  if new.status = 'completed' then
    perform public.sona_settle_charge(new.id, false, 'completed');
  elsif new.status = 'cancelled' or public.sona_caller_is_user() then
    if v_spend = 'none' then
      perform public.sona_settle_charge(new.id, true, 'cancelled before generation');
    else
      perform public.sona_settle_charge(new.id, false, 'cancelled after generation began');
    end if;
  elsif v_spend = 'paid' then
    perform public.sona_settle_charge(new.id, false, 'failed after a paid generation');
  else
    perform public.sona_settle_charge(new.id, true, 'failed');
  end if;
  return null;
end $$;
revoke all on function public.jobs_settle_charge() from public, anon, authenticated;
grant execute on function public.jobs_settle_charge() to service_role;
create trigger jobs_settle_charge after update of status on public.jobs
  for each row
  when (old.status is distinct from new.status and new.status in ('failed', 'cancelled', 'completed'))
  execute function public.jobs_settle_charge();

-- At insert: link the charge; over quota on the service-role path, fail (and refund) at once. Named
-- to fire before jobs_derive_stage (triggers fire in name order), so the stage follows a status this
-- trigger sets. Takes the user's quota lock (the one sona_enforce_quota takes), so one user's
-- inserts link their charges, and count their quotas, one at a time.
create or replace function public.jobs_charge_link() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_tokens integer;
  v_active integer;
  v_day integer;
  v_message text;
begin
  if not public.sona_tokens_present() or public.sona_caller_is_user() then
    return new;
  end if;
  perform pg_advisory_xact_lock(hashtextextended('sona.quota:' || new.user_id::text, 0));
  v_tokens := public.sona_link_charge(new.id, new.user_id, new.mode, new.duration, new.quality, new.prompt,
                                      now());
  if v_tokens is not null and new.status in ('pending', 'queued')
     and to_regprocedure('public.sona_setting(text)') is not null then
    select count(*) filter (where j.status in ('pending', 'queued', 'processing')),
           count(*) filter (where j.created_at > now() - interval '24 hours')
      into v_active, v_day
      from public.jobs j where j.user_id = new.user_id;
    if v_active >= public.sona_setting('max_active_jobs') then
      perform nextval('public.sona_refused_active_seq');
      v_message := format('You have %s %s running; wait for one to finish. Your tokens were refunded.',
                          v_active, case when v_active = 1 then 'job' else 'jobs' end);
    elsif v_day >= public.sona_setting('max_jobs_per_day') then
      perform nextval('public.sona_refused_daily_seq');
      v_message := format('You have started %s jobs in the last 24 hours, the most allowed; try again'
                          ' later. Your tokens were refunded.', v_day);
    end if;
    if v_message is not null then
      new.status := 'failed';
      new.error_message := v_message;
      new.completed_at := now();
    end if;
  end if;
  if new.status in ('failed', 'cancelled') then
    perform public.sona_settle_charge(new.id, true, coalesce(v_message, new.status));
  elsif new.status = 'completed' then
    perform public.sona_settle_charge(new.id, false, 'completed');
  end if;
  return new;
end $$;
revoke all on function public.jobs_charge_link() from public, anon, authenticated;
grant execute on function public.jobs_charge_link() to service_role;
create trigger jobs_charge_link before insert on public.jobs
  for each row execute function public.jobs_charge_link();

-- Tokens charged by the jobs created in the window, tokens refunded in the window, and the jobs of
-- the window whose charge was not found (refunded nothing) or whose refund failed.
create or replace function public.token_stats(p_window_hours integer default 24)
returns jsonb
language sql stable security invoker set search_path = '' as $$
  with since as (
    select now() - make_interval(hours => p_window_hours) as t
  )
  select jsonb_build_object(
    'tokens_present', public.sona_tokens_present(),
    'jobs_charged', count(*) filter (where c.linked_at >= s.t and c.transaction_id is not null),
    'tokens_charged', coalesce(sum(c.tokens) filter (where c.linked_at >= s.t), 0),
    'refunds', count(*) filter (where c.settled_at >= s.t and c.settlement = 'refunded'),
    'tokens_refunded', coalesce(sum(c.tokens) filter (where c.settled_at >= s.t and c.settlement = 'refunded'), 0),
    'charge_not_found', count(*) filter (where c.linked_at >= s.t and c.transaction_id is null),
    'refund_failed', count(*) filter (where c.settled_at >= s.t and c.settlement = 'refund_failed'))
  from public.sona_job_charges c, since s
$$;
revoke all on function public.token_stats(integer) from public, anon, authenticated;
grant execute on function public.token_stats(integer) to service_role;
