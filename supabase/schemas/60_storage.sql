-- Files: what the output bucket keeps, what is deleted and when, and the inputs bucket.
--
-- Retention: complete_job keeps each user's newest keep_outputs_per_user outputs and clears the
-- older ones' paths; the plug-in's daily cleanup clears paths older than 24 h. Whenever a row's
-- paths are cleared (or the row is deleted) by a trusted hand (the service functions, the scheduled
-- retention: never anon or a user, through whatever definer function), its WAV, MP3 and peaks file
-- are queued here and a reclaim_jobs deletes them once storage_delete_delay_seconds (a day) has
-- passed, so a mistaken clearing can be undone by setting the path again (deleting a name already
-- gone is a no-op, so the plug-in's cleanup having done it is fine); the row's URLs are cleared in
-- the same statement. The files a worker stored for a job cancelled during its generation are
-- queued by complete_job, due at once.

create table public.sona_storage_garbage (
  id bigint generated always as identity primary key,
  name text not null unique,
  queued_at timestamptz not null default now(),
  -- not deleted before: a cleared path waits storage_delete_delay_seconds, so a mistake can be undone
  due_at timestamptz not null default now()
);
alter table public.sona_storage_garbage enable row level security;
revoke all on public.sona_storage_garbage from public, anon, authenticated;
grant all on public.sona_storage_garbage to service_role;

-- The peaks file sits beside the MP3 preview (same stamp, .json), so it goes with it.
create or replace function public.sona_output_names(p_master text, p_preview text)
returns text[] language sql immutable set search_path = '' as $$
  select array_remove(array[p_master, p_preview,
    case when p_preview like '%.mp3' then left(p_preview, -4) || '.json' end], null)
$$;

-- The files of a row whose paths were cleared or changed, or which was deleted.
create or replace function public.jobs_queue_expired_files() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  v_kept text[] := case when tg_op = 'UPDATE' then array[new.master_path, new.preview_path] else '{}' end;
begin
  if public.sona_caller_is_user() then
    raise log 'sona: paths of job % cleared by role %; its files are kept', old.id,
      coalesce(nullif(current_setting('role', true), ''), current_user);
    return null;
  end if;
  insert into public.sona_storage_garbage (name, due_at)
  select n, now() + make_interval(secs => public.sona_setting('storage_delete_delay_seconds'))
    from unnest(public.sona_output_names(old.master_path, old.preview_path)) n
   where n <> all (array_remove(v_kept, null))
  on conflict (name) do nothing;
  return null;
end $$;
revoke all on function public.jobs_queue_expired_files() from public, anon, authenticated;
grant execute on function public.jobs_queue_expired_files() to service_role;
create trigger jobs_queue_expired_files after update of master_path, preview_path or delete on public.jobs
  for each row when (old.master_path is not null or old.preview_path is not null)
  execute function public.jobs_queue_expired_files();

-- A path set again before its files were deleted (a mistaken clearing undone) keeps them.
create or replace function public.jobs_keep_restored_files() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  delete from public.sona_storage_garbage g
   where g.name = any (public.sona_output_names(new.master_path, new.preview_path));
  return null;
end $$;
revoke all on function public.jobs_keep_restored_files() from public, anon, authenticated;
grant execute on function public.jobs_keep_restored_files() to service_role;
create trigger jobs_keep_restored_files after update of master_path, preview_path on public.jobs
  for each row when (new.master_path is not null or new.preview_path is not null)
  execute function public.jobs_keep_restored_files();

-- A row whose files are gone keeps no URL to them (nor to its peaks).
create or replace function public.jobs_forget_expired_urls() returns trigger
language plpgsql set search_path = '' as $$
begin
  if new.master_path is null and new.preview_path is null then
    new.wav_url := null;
    new.mp3_url := null;
    new.result_url := null;
    new.audio := new.audio - 'peaks_url';
  end if;
  return new;
end $$;
-- Named to run before jobs_derive_stage (alphabetical), which copies audio's peaks_url to its column.
create trigger jobs_clear_expired_urls before update of master_path, preview_path on public.jobs
  for each row when (old.master_path is not null or old.preview_path is not null)
  execute function public.jobs_forget_expired_urls();

-- reclaim_jobs reads what is due and says what it deleted.
create or replace function public.sona_storage_garbage_due(p_limit integer)
returns setof public.sona_storage_garbage
language sql stable security invoker set search_path = '' as $$
  select * from public.sona_storage_garbage g where g.due_at <= now() order by g.id limit p_limit
$$;
revoke all on function public.sona_storage_garbage_due(integer) from public, anon, authenticated;
grant execute on function public.sona_storage_garbage_due(integer) to service_role;

create or replace function public.sona_storage_garbage_done(p_ids bigint[])
returns integer
language sql volatile security invoker set search_path = '' as $$
  with gone as (delete from public.sona_storage_garbage g where g.id = any (p_ids) returning 1)
  select count(*)::integer from gone
$$;
revoke all on function public.sona_storage_garbage_done(bigint[]) from public, anon, authenticated;
grant execute on function public.sona_storage_garbage_done(bigint[]) to service_role;

-- Audio-to-audio's inputs: the musician uploads the source audio to this private bucket, under a
-- folder named by their user id ('{user_id}/take.wav'), and names it in input_path. Audio only,
-- within the provider's 50 MB request.
insert into storage.buckets (id, name, public, file_size_limit, allowed_mime_types)
values ('audio-inputs', 'audio-inputs', false, 50000000,
        array['audio/wav', 'audio/x-wav', 'audio/wave', 'audio/vnd.wave', 'audio/mpeg', 'audio/mp3']);

-- A signed-in user may upload, read, replace and delete only inside their own folder of the inputs
-- bucket (Supabase's own policy shape). The function reads with the service role (bypasses RLS).
create policy sona_inputs_select_own on storage.objects for select to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
create policy sona_inputs_insert_own on storage.objects for insert to authenticated
  with check (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
create policy sona_inputs_update_own on storage.objects for update to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text))
  with check (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
create policy sona_inputs_delete_own on storage.objects for delete to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
