-- Settings an operator changes without a migration (an insert or update as the service role); a
-- missing row means the default written in sona_setting().

create table public.sona_settings (
  key text primary key constraint sona_settings_key_check check (key in (
    'max_active_jobs', 'max_jobs_per_day', 'pause_seconds', 'pause_max_wait_seconds',
    'keep_outputs_per_user', 'legacy_processing_timeout_seconds', 'storage_delete_delay_seconds')),
  value integer not null check (value >= 0),
  updated_at timestamptz not null default now()
);
alter table public.sona_settings enable row level security;
-- Users may read the limits (the plug-in can show them); only the service role writes.
create policy sona_settings_read on public.sona_settings for select to authenticated using (true);
revoke all on public.sona_settings from public, anon, authenticated;
grant select on public.sona_settings to authenticated;
grant all on public.sona_settings to service_role;

create or replace function public.sona_setting(p_key text) returns integer
language sql stable security invoker set search_path = '' as $$
  select coalesce(
    (select s.value from public.sona_settings s where s.key = p_key),
    case p_key
      when 'max_active_jobs' then 3
      when 'max_jobs_per_day' then 100
      when 'pause_seconds' then 300
      when 'pause_max_wait_seconds' then 86400
      when 'keep_outputs_per_user' then 7            -- 0 keeps every output
      when 'legacy_processing_timeout_seconds' then 3600
      when 'storage_delete_delay_seconds' then 86400 -- time to undo a mistaken clearing
    end)
$$;
-- Read by the quota trigger, which runs as the inserting user.
revoke all on function public.sona_setting(text) from public, anon;
grant execute on function public.sona_setting(text) to authenticated, service_role;
