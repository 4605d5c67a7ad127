-- Rows as the real plug-in's database holds them: one per state (pending, queued, processing with no
-- lease, completed with its paths, failed) and per mode (designer, producer, creator, and the
-- December era's free text), written the way `generate` and the old worker wrote them:
-- musical_key, producer_config and naming_convention are jsonb STRING scalars holding compact JSON
-- (JSON.stringify'd by generate), master_path = preview_path = one WAV under `generated/` (the old
-- worker uploaded only the WAV), status `queued` from generate, `pending` before it existed.
-- Every January job was charged by generate just before its insert (one 'usage' row worded as
-- generate words it); the December job predates the tokens. Users get the 500-token welcome bonus
-- from the plug-in's trigger on auth.users. Ids are fixed: tests/plugin/plugin_db.py names them.
-- Times are relative to now() so the 24-hour retention window means the same in every run.

insert into auth.users (id, email, created_at) values
  ('11111111-1111-4111-8111-111111111111', 'musician@example.com', now() - interval '40 days'),
  ('22222222-2222-4222-8222-222222222222', 'other@example.com', now() - interval '30 days'),
  ('33333333-3333-4333-8333-333333333333', 'admin@example.com', now() - interval '50 days')
on conflict (id) do nothing;

insert into public.admin_users (user_id, notes)
values ('33333333-3333-4333-8333-333333333333', 'first admin')
on conflict (user_id) do nothing;

insert into public.jobs (
  id, user_id, prompt, duration, quality, mode, status, created_at, completed_at, error_message,
  naming_convention, skip_naming, musical_key, producer_config, user_email, enhanced_prompt,
  filename, master_path, preview_path, public, public_path
) values
  -- December 2025: the UI's old free-text mode, `pending` (generate did not exist yet), no tokens.
  ('a0000000-0000-4000-8000-000000000001', '11111111-1111-4111-8111-111111111111',
   'rain on a tin roof at night', 8, 'medium', 'ambient', 'pending', now() - interval '20 days',
   null, null, null, false, null, null, null, null, null, null, null, false, null),
  -- designer, queued by generate, with the user's naming convention.
  ('a0000000-0000-4000-8000-000000000002', '11111111-1111-4111-8111-111111111111',
   'glass shattering on a concrete floor, close mic', 5, 'high', 'designer', 'queued',
   now() - interval '2 minutes', null, null,
   to_jsonb('{"parameters":[{"type":"category"},{"type":"description"},{"type":"creator","value":"JA"}],"separator":"_"}'::text),
   false, null, null, null, null, null, null, null, false, null),
  -- producer, taken by the old worker: `processing`, no lease of any kind.
  ('a0000000-0000-4000-8000-000000000003', '11111111-1111-4111-8111-111111111111',
   'dusty boom bap drum loop with vinyl crackle', 16, 'medium', 'producer', 'processing',
   now() - interval '5 minutes', null, null, null, false,
   to_jsonb('{"key":"A","scale":"minor"}'::text),
   to_jsonb('{"type":"loop","bpm":90,"timeSignature":"4/4","bars":8}'::text),
   null, null, null, null, null, false, null),
  -- creator, completed an hour ago, shared in the public showcase.
  ('a0000000-0000-4000-8000-000000000004', '11111111-1111-4111-8111-111111111111',
   'uplifting synthwave anthem with soaring lead', 120, 'high', 'creator', 'completed',
   now() - interval '62 minutes', now() - interval '60 minutes', null, null, false,
   to_jsonb('{"key":"F#","scale":"major"}'::text),
   to_jsonb('{"type":"song","bpm":110,"timeSignature":"4/4","bars":4}'::text),
   'musician@example.com',
   'uplifting synthwave anthem with soaring lead. 110 BPM, F# major, 2 minutes',
   'Uplifting_Synthwave_Anthem_musician',
   'generated/Uplifting_Synthwave_Anthem_musician_1768400000000.wav',
   'generated/Uplifting_Synthwave_Anthem_musician_1768400000000.wav',
   true, 'showcase/a0000000-0000-4000-8000-000000000004.wav'),
  -- designer, completed two days ago: past the 24-hour retention, the cleanup's to forget.
  ('a0000000-0000-4000-8000-000000000005', '11111111-1111-4111-8111-111111111111',
   'door creak', 3, 'low', 'designer', 'completed',
   now() - interval '2 days 5 minutes', now() - interval '2 days', null, null, true,
   null, null, null, 'door creak. very short', 'DOORWood_Creak_JA',
   'generated/DOORWood_Creak_JA_1768300000000.wav', 'generated/DOORWood_Creak_JA_1768300000000.wav',
   false, null),
  -- designer, failed by the old worker (its message, as it wrote it).
  ('a0000000-0000-4000-8000-000000000006', '11111111-1111-4111-8111-111111111111',
   'thunder rolling over mountains', 25, 'medium', 'designer', 'failed',
   now() - interval '3 hours', null, 'Failed to generate audio from TangoFlux', null, false,
   null, null, null, null, null, null, null, false, null),
  -- another musician's completed producer loop: hidden from the first, seen by the admin.
  ('a0000000-0000-4000-8000-000000000007', '22222222-2222-4222-8222-222222222222',
   'deep house bassline in G minor', 30, 'high', 'producer', 'completed',
   now() - interval '30 minutes', now() - interval '29 minutes', null, null, false,
   to_jsonb('{"key":"G","scale":"minor"}'::text),
   to_jsonb('{"type":"loop","bpm":124,"timeSignature":"4/4","bars":16}'::text),
   null, 'deep house bassline in G minor. 124 BPM, G minor, 4/4 time, 16 bars, 30 seconds',
   'Deep_House_Bassline_Gmin_124',
   'generated/Deep_House_Bassline_Gmin_124_1768500000000.wav',
   'generated/Deep_House_Bassline_Gmin_124_1768500000000.wav', false, null)
on conflict (id) do nothing;

-- What generate charged for each January job, a second before its insert.
with charge (user_id, amount, description, job_id) as (values
  ('11111111-1111-4111-8111-111111111111'::uuid, 14,
   'Designer (5s, high): "glass shattering on a concrete..."', 'a0000000-0000-4000-8000-000000000002'::uuid),
  ('11111111-1111-4111-8111-111111111111'::uuid, 21,
   'Producer (16s, medium): "dusty boom bap drum loop with ..."', 'a0000000-0000-4000-8000-000000000003'::uuid),
  ('11111111-1111-4111-8111-111111111111'::uuid, 38,
   'Creator (2m, high): "uplifting synthwave anthem wit..."', 'a0000000-0000-4000-8000-000000000004'::uuid),
  ('11111111-1111-4111-8111-111111111111'::uuid, 6,
   'Designer (3s, low): "door creak"', 'a0000000-0000-4000-8000-000000000005'::uuid),
  ('11111111-1111-4111-8111-111111111111'::uuid, 11,
   'Designer (25s, medium): "thunder rolling over mountains"', 'a0000000-0000-4000-8000-000000000006'::uuid),
  ('22222222-2222-4222-8222-222222222222'::uuid, 30,
   'Producer (30s, high): "deep house bassline in G minor"', 'a0000000-0000-4000-8000-000000000007'::uuid)
), logged as (
  insert into public.token_transactions (user_id, amount, type, description, created_at)
  select c.user_id, -c.amount, 'usage', c.description, j.created_at - interval '1 second'
    from charge c join public.jobs j on j.id = c.job_id
   where not exists (select 1 from public.token_transactions t where t.type = 'usage' and t.user_id = c.user_id
                       and t.description = c.description)
  returning user_id, amount
)
update public.user_tokens u
   set balance = u.balance + s.total, lifetime_used = u.lifetime_used - s.total
  from (select user_id, sum(amount) as total from logged group by user_id) s
 where u.user_id = s.user_id;
