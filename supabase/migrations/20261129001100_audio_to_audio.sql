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

-- No check on mode: a mode the function does not know fails that job with a message (sona/modes.py),
-- never the insert (the plug-in has charged its tokens by then) nor this migration (docs/plugin-client.md).
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
