-- The real plug-in's database as it stands at its newest (sona-plugin, January 2026), restated in
-- this project's words from the facts in PLUGIN.md and a reading of the plug-in's migrations.
-- Applied after devstack/sql/supabase_stand_ins.sql (roles, auth, storage) and WITHOUT this
-- project's migrations, so tests can see the client exactly as it is, then apply ours on top.
--
-- What it holds (and where each fact comes from in the plug-in):
--   jobs and its checks, the updated_at trigger          20251226 create/add_audio_urls, 20260104
--   jsonb musical_key / producer_config                 20260102_add_musical_key_producer_config
--   enhanced_prompt, filename, skip_naming, user_email  20260102, 20260105, 20260113
--   naming_convention jsonb, master_path, preview_path,
--     public, public_path                               used by generate / the UI / the cleanup; no
--                                                       migration makes them (made in the dashboard)
--   the five policies on jobs                           20251226 (own x3), 20260115 (admins),
--                                                       20260120_public_jobs_anon_access
--   admin_users and is_admin()                          20260115_create_admin_system
--   user_tokens, token_transactions, add_user_tokens,
--     use_tokens, check_user_tokens, balance getter     20260103_create_token_system, _token_usage
--   app_config and the 500-token welcome bonus          20260103_beta_bonus_tokens
--   buckets audio-files (private), public-audio, and
--     the owner's read policy on storage.objects        20260120_storage_policies (worker made the
--                                                       buckets)
--   cleanup_expired_audio_paths()                       20260120_cleanup_expired_audio
-- Left out: naming conventions, community, reports, beta applications (no job column depends on
-- them), and pg_cron / pg_net scheduling of the cleanup (not on the embedded server).
-- Deliberate differences: ids default to the core gen_random_uuid() (the plug-in's uuid-ossp is
-- not in the embedded server); `public` defaults to false (its dashboard default is not known).
-- Idempotent, so a test may apply it twice.

-- ---------------------------------------------------------------------------------- jobs
create table if not exists public.jobs (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  prompt text not null,
  duration integer not null default 10,
  quality text not null default 'medium',
  mode text not null default 'default',
  status text not null default 'pending',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  completed_at timestamptz,
  error_message text,
  result_url text,
  wav_url text,
  mp3_url text,
  musical_key jsonb,
  producer_config jsonb,
  enhanced_prompt text,
  filename text,
  naming_convention jsonb,
  skip_naming boolean default false,
  user_email text,
  master_path text,
  preview_path text,
  public boolean default false,
  public_path text,
  constraint valid_duration check (duration >= 1 and duration <= 180),
  constraint valid_quality check (quality in ('low', 'medium', 'high')),
  constraint valid_status check (status in ('pending', 'queued', 'processing', 'completed', 'failed'))
);

create index if not exists idx_jobs_user_id on public.jobs (user_id);
create index if not exists idx_jobs_status on public.jobs (status);
create index if not exists idx_jobs_created_at on public.jobs (created_at desc);
create index if not exists idx_jobs_public on public.jobs (public) where public = true;
create index if not exists idx_jobs_cleanup on public.jobs (status, completed_at)
  where status = 'completed' and (master_path is not null or preview_path is not null);

-- The plug-in's one timestamp function, shared by its tables.
create or replace function public.update_updated_at_column() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end $$;

drop trigger if exists update_jobs_updated_at on public.jobs;
create trigger update_jobs_updated_at before update on public.jobs
  for each row execute function public.update_updated_at_column();

-- ---------------------------------------------------------------------------------- admins
create table if not exists public.admin_users (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  granted_by uuid references auth.users (id),
  granted_at timestamptz not null default now(),
  notes text,
  is_active boolean not null default true,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint unique_admin_user unique (user_id)
);

-- An admin is a user with an active row in admin_users; definer rights so a policy can ask.
create or replace function public.is_admin(check_user_id uuid) returns boolean
language plpgsql security definer as $$
begin
  return exists (select 1 from public.admin_users a where a.user_id = check_user_id and a.is_active);
end $$;

alter table public.admin_users enable row level security;
drop policy if exists "Admins can view admin_users" on public.admin_users;
create policy "Admins can view admin_users" on public.admin_users for select
  using (public.is_admin(auth.uid()));

-- ---------------------------------------------------------------------------------- policies on jobs
alter table public.jobs enable row level security;

drop policy if exists "Users can view own jobs" on public.jobs;
create policy "Users can view own jobs" on public.jobs for select
  using (auth.uid() = user_id);
drop policy if exists "Users can create jobs" on public.jobs;
create policy "Users can create jobs" on public.jobs for insert
  with check (auth.uid() = user_id);
drop policy if exists "Users can update own jobs" on public.jobs;
create policy "Users can update own jobs" on public.jobs for update
  using (auth.uid() = user_id) with check (auth.uid() = user_id);
drop policy if exists "Admins can view all jobs" on public.jobs;
create policy "Admins can view all jobs" on public.jobs for select
  using (public.is_admin(auth.uid()));
-- No role named: it applies to everyone, anon included (the landing page's showcase).
drop policy if exists "Anyone can view public jobs" on public.jobs;
create policy "Anyone can view public jobs" on public.jobs for select
  using (public = true and status = 'completed' and public_path is not null);

-- ---------------------------------------------------------------------------------- tokens
create table if not exists public.user_tokens (
  user_id uuid primary key references auth.users (id) on delete cascade,
  balance integer not null default 0,
  lifetime_purchased integer not null default 0,
  lifetime_used integer not null default 0,
  stripe_customer_id text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint balance_non_negative check (balance >= 0),
  constraint lifetime_purchased_non_negative check (lifetime_purchased >= 0),
  constraint lifetime_used_non_negative check (lifetime_used >= 0)
);

create table if not exists public.token_transactions (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  amount integer not null,
  type text not null,
  description text not null,
  stripe_payment_id text,
  created_at timestamptz not null default now(),
  constraint valid_transaction_type check (type in ('purchase', 'usage', 'bonus', 'refund', 'subscription'))
);

create index if not exists idx_token_transactions_user_id on public.token_transactions (user_id);
create index if not exists idx_token_transactions_created_at on public.token_transactions (created_at desc);
create index if not exists idx_token_transactions_type on public.token_transactions (type);

alter table public.user_tokens enable row level security;
alter table public.token_transactions enable row level security;
drop policy if exists "Users can view own tokens" on public.user_tokens;
create policy "Users can view own tokens" on public.user_tokens for select using (auth.uid() = user_id);
drop policy if exists "Users can view own transactions" on public.token_transactions;
create policy "Users can view own transactions" on public.token_transactions for select
  using (auth.uid() = user_id);
drop policy if exists "Admins can view all token_transactions" on public.token_transactions;
create policy "Admins can view all token_transactions" on public.token_transactions for select
  using (public.is_admin(auth.uid()));
drop policy if exists "Admins can view all user_tokens" on public.user_tokens;
create policy "Admins can view all user_tokens" on public.user_tokens for select
  using (public.is_admin(auth.uid()));

create or replace function public.update_user_tokens_updated_at() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end $$;
drop trigger if exists trigger_user_tokens_updated_at on public.user_tokens;
create trigger trigger_user_tokens_updated_at before update on public.user_tokens
  for each row execute function public.update_user_tokens_updated_at();

-- Credit (or debit) a user and log it; a positive amount also counts as purchased, as the plug-in
-- has it (its payment webhook and its admin page call this).
create or replace function public.add_user_tokens(
  p_user_id uuid, p_amount integer, p_transaction_type text, p_description text,
  p_stripe_payment_id text default null
) returns void
language plpgsql security definer set search_path = public as $$
begin
  if p_transaction_type not in ('purchase', 'usage', 'bonus', 'refund', 'subscription') then
    raise exception 'Invalid transaction type: %', p_transaction_type;
  end if;
  insert into user_tokens as t (user_id, balance, lifetime_purchased, updated_at)
  values (p_user_id, greatest(0, p_amount), greatest(0, p_amount), now())
  on conflict (user_id) do update
    set balance = greatest(0, t.balance + p_amount),
        lifetime_purchased = t.lifetime_purchased + greatest(0, p_amount),
        updated_at = now();
  insert into token_transactions (user_id, amount, type, description, stripe_payment_id)
  values (p_user_id, p_amount, p_transaction_type, p_description, p_stripe_payment_id);
end $$;

-- Charge a generation: false (and nothing written) without a balance row or enough tokens; else
-- the balance goes down under a row lock and one 'usage' row with the negative amount is logged.
create or replace function public.use_tokens(
  p_user_id uuid, p_amount integer, p_description text default 'Audio generation'
) returns boolean
language plpgsql security definer set search_path = public as $$
declare
  v_balance integer;
begin
  if p_amount <= 0 then
    raise exception 'Amount must be positive, got: %', p_amount;
  end if;
  select balance into v_balance from user_tokens where user_id = p_user_id for update;
  if v_balance is null or v_balance < p_amount then
    return false;
  end if;
  update user_tokens
     set balance = balance - p_amount, lifetime_used = lifetime_used + p_amount, updated_at = now()
   where user_id = p_user_id;
  insert into token_transactions (user_id, amount, type, description)
  values (p_user_id, -p_amount, 'usage', p_description);
  return true;
end $$;

create or replace function public.check_user_tokens(p_user_id uuid, p_required integer default 20)
returns boolean
language plpgsql security definer set search_path = public as $$
begin
  return coalesce((select balance from user_tokens where user_id = p_user_id), 0) >= p_required;
end $$;

create or replace function public.get_user_token_balance(p_user_id uuid) returns integer
language plpgsql security definer set search_path = public as $$
begin
  return coalesce((select balance from user_tokens where user_id = p_user_id), 0);
end $$;

grant select on public.user_tokens, public.token_transactions to authenticated;

-- ---------------------------------------------------------------------------------- welcome bonus
create table if not exists public.app_config (
  key text primary key,
  value text not null,
  description text,
  updated_at timestamptz not null default now()
);
insert into public.app_config (key, value, description) values
  ('beta_bonus_enabled', 'true', 'New users get the welcome bonus'),
  ('beta_bonus_amount', '500', 'Tokens in the welcome bonus')
on conflict (key) do nothing;

-- Every new auth user starts with the bonus (one 'bonus' row), while the beta flag is on.
create or replace function public.grant_beta_bonus_tokens() returns trigger
language plpgsql security definer set search_path = public as $$
declare
  v_amount integer;
begin
  if coalesce((select value = 'true' from app_config where key = 'beta_bonus_enabled'), false) then
    v_amount := coalesce((select value::integer from app_config where key = 'beta_bonus_amount'), 500);
    insert into user_tokens (user_id, balance) values (new.id, v_amount) on conflict (user_id) do nothing;
    insert into token_transactions (user_id, amount, type, description)
    values (new.id, v_amount, 'bonus', 'Welcome bonus - Closed Beta');
  end if;
  return new;
end $$;
drop trigger if exists trigger_grant_beta_bonus on auth.users;
create trigger trigger_grant_beta_bonus after insert on auth.users
  for each row execute function public.grant_beta_bonus_tokens();

-- ---------------------------------------------------------------------------------- storage
insert into storage.buckets (id, name, public) values
  ('audio-files', 'audio-files', false),
  ('public-audio', 'public-audio', true)
on conflict (id) do nothing;

-- The owner may read (and so sign) an object of the private bucket only when its name is one of
-- their jobs' master_path or preview_path.
drop policy if exists "Users can view own audio files" on storage.objects;
create policy "Users can view own audio files" on storage.objects for select to authenticated
  using (
    bucket_id = 'audio-files'
    and exists (
      select 1 from public.jobs j
       where j.user_id = auth.uid() and (j.master_path = objects.name or j.preview_path = objects.name)
    )
  );

-- ---------------------------------------------------------------------------------- retention
-- Forget the audio paths of completed jobs older than the window (a batch at a time) and answer
-- what was forgotten, so the caller can delete the objects.
create or replace function public.cleanup_expired_audio_paths(
  expiration_hours integer default 24, batch_limit integer default 100
) returns table (job_id uuid, master_path text, preview_path text, completed_at timestamptz)
language plpgsql security definer as $$
begin
  return query
  with expired as (
    select j.id, j.master_path as m, j.preview_path as p, j.completed_at as c
      from public.jobs j
     where j.status = 'completed'
       and j.completed_at < now() - make_interval(hours => expiration_hours)
       and (j.master_path is not null or j.preview_path is not null)
     limit batch_limit
     for update skip locked
  ), cleared as (
    update public.jobs u set master_path = null, preview_path = null, updated_at = now()
     where u.id in (select e.id from expired e)
    returning u.id
  )
  select e.id, e.m, e.p, e.c from expired e;
end $$;
-- As in the plug-in: granted to the service role, and left callable by everyone else too (nothing
-- revokes PUBLIC's default right to execute).
grant execute on function public.cleanup_expired_audio_paths(integer, integer) to service_role;
