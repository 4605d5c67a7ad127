-- Audio-to-audio: the plug-in's second mode. The musician uploads the source audio to a private
-- inputs bucket, under a folder named by their user id, and inserts a job that names it.
-- Idempotent; valid on PostgreSQL 15 and newer. Needs Supabase's storage schema (storage.buckets,
-- storage.objects with row level security on, storage.foldername()).

-- The request columns the mode needs. input_path is the object's name inside the inputs bucket
-- ('{user_id}/take.wav', what the upload answered as `path`; the `fullPath` form with the bucket
-- in front is accepted too). strength: 0 keeps the input, 1 ignores it (the provider's range).
alter table public.jobs
  add column if not exists input_path text,
  add column if not exists strength double precision;

-- The mode names the plug-in's selector sends; 'default' is today's rows (text-to-audio).
-- Unfinished rows with a mode the function never ran are failed first, with the message the
-- function gave them: a check constraint also binds updates, so such a row could not be claimed.
update public.jobs
   set status = 'failed',
       error_message = 'The ''' || mode || ''' mode is not supported; choose text-to-audio or audio-to-audio.',
       completed_at = now(),
       lease_token = null,
       lease_expires_at = null
 where status in ('pending', 'queued', 'processing')
   and mode not in ('default', 'text-to-audio', 'audio-to-audio');

do $$ begin
  alter table public.jobs add constraint jobs_mode_known
    check (mode in ('default', 'text-to-audio', 'audio-to-audio')) not valid;
exception when duplicate_object then null;
end $$;
do $$ begin
  alter table public.jobs add constraint jobs_strength_range
    check (strength is null or (strength >= 0 and strength <= 1));
exception when duplicate_object then null;
end $$;
do $$ begin
  alter table public.jobs add constraint jobs_audio_to_audio_input
    check (mode <> 'audio-to-audio' or (input_path is not null and length(input_path) between 1 and 1024));
exception when duplicate_object then null;
end $$;
-- Finished rows of the earlier worker may carry free-text modes ('ambient'); they stay as they are
-- and the constraint binds every new or changed row. Validated when no such row exists.
do $$ begin
  if not exists (select 1 from public.jobs where mode not in ('default', 'text-to-audio', 'audio-to-audio')) then
    alter table public.jobs validate constraint jobs_mode_known;
  end if;
end $$;

-- Insertable by the user like the other request columns (column privileges, as in the first migration).
grant insert (input_path, strength) on public.jobs to authenticated;

-- The inputs bucket: private (no public URLs), audio only, within the provider's 50 MB request.
insert into storage.buckets (id, name, public, file_size_limit, allowed_mime_types)
values ('audio-inputs', 'audio-inputs', false, 50000000,
        array['audio/wav', 'audio/x-wav', 'audio/wave', 'audio/vnd.wave', 'audio/mpeg', 'audio/mp3'])
on conflict (id) do update
  set public = false,
      file_size_limit = excluded.file_size_limit,
      allowed_mime_types = excluded.allowed_mime_types;

-- A signed-in user may upload, read, replace and delete only inside their own folder of the inputs
-- bucket (Supabase's own policy shape). The function reads with the service role (bypasses RLS).
drop policy if exists sona_inputs_select_own on storage.objects;
drop policy if exists sona_inputs_insert_own on storage.objects;
drop policy if exists sona_inputs_update_own on storage.objects;
drop policy if exists sona_inputs_delete_own on storage.objects;

create policy sona_inputs_select_own on storage.objects for select to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
create policy sona_inputs_insert_own on storage.objects for insert to authenticated
  with check (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
create policy sona_inputs_update_own on storage.objects for update to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text))
  with check (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
create policy sona_inputs_delete_own on storage.objects for delete to authenticated
  using (bucket_id = 'audio-inputs' and (storage.foldername(name))[1] = (select auth.uid()::text));
