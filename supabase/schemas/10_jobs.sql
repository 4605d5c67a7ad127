-- The jobs table: what a musician asks for, what the worker made of it, and where each attempt is.
-- The plug-in (JaimeAlonsoGA/sona-plugin, docs/plugin-client.md) inserts into it with its `generate` Edge
-- Function and reads it back; the earlier worker's clients use the same table. Valid on PostgreSQL
-- 15 and newer; needs Supabase's auth schema and the roles anon, authenticated and service_role.

create table public.jobs (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  -- the request (prompt at most the provider's 10000 characters; duration up to stable-audio-3's 380 s)
  prompt text not null constraint jobs_prompt_length check (char_length(prompt) <= 10000),
  duration integer not null default 10 constraint jobs_duration_check check (duration between 1 and 380),
  quality text not null default 'medium' constraint jobs_quality_check check (quality in ('low', 'medium', 'high')),
  -- no check on mode: a mode the function does not know fails its job with a message
  -- (sona/modes.py), never the insert (the plug-in has charged its tokens by then)
  mode text not null default 'default',
  status text not null default 'pending' constraint jobs_status_check
    check (status in ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled')),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  completed_at timestamptz,
  error_message text,
  -- the earlier worker's results: URLs (result_url = mp3_url)
  result_url text,
  wav_url text,
  mp3_url text,
  -- the attempt: how many were counted, the lease that fences every write of the running one
  attempts integer not null default 0,
  lease_token uuid,
  lease_expires_at timestamptz,
  run_after timestamptz,
  dispatched_at timestamptz,
  started_at timestamptz,
  -- what the stored audio is (duration, format, model, peaks_url)
  audio jsonb,
  -- a finishing attempt: it completes the job from files a paid attempt stored, never pays
  reuse_only boolean not null default false,
  -- dispatch rounds: Cloud Tasks keeps a task's name reserved, so each dispatch names a new one
  dispatches integer not null default 0,
  cancelled_at timestamptz,
  -- when an outage first sent the job back to wait; a job waiting too long fails as unavailable
  waiting_since timestamptz,
  -- audio-to-audio: the input's object name in the inputs bucket, and how far to move from it
  input_path text,
  strength double precision constraint jobs_strength_range check (strength is null or (strength >= 0 and strength <= 1)),
  -- what the plug-in shows while a job runs, and the waveform peaks file's URL
  stage text not null default 'queued' constraint jobs_stage_check check (stage in (
    'queued', 'claimed', 'generating', 'encoding', 'uploading', 'done', 'failed', 'cancelled')),
  peaks_url text,
  -- the plug-in's request columns: JSON objects, or JSON strings holding them (as generate stores them)
  musical_key jsonb,       -- {"key","scale"}
  producer_config jsonb,   -- {"type","bpm","timeSignature","bars"}
  naming_convention jsonb, -- {"parameters": [...], "separator"}
  skip_naming boolean default false,
  user_email text,
  -- what the plug-in's player reads: the exact prompt sent, the download name, the object names
  enhanced_prompt text,
  -- a download name, never a path (sona/job/naming.py builds it so)
  filename text constraint jobs_filename_safe check (
    filename is null
    or (char_length(filename) between 1 and 200 and filename !~ '[/\\[:cntrl:]]' and filename !~ '^\.')
  ),
  master_path text,        -- the WAV in the output bucket
  preview_path text,       -- the MP3 (the player signs it)
  public boolean default false,
  public_path text,
  -- what a waiting job shows: 'queued' for the plug-in, 'pending' for the earlier worker's clients
  wait_status text constraint jobs_wait_status_check check (wait_status in ('pending', 'queued')),
  -- the paid generation's id (Stable Audio 3 answers it before the audio), fetched again by every
  -- later attempt; and how many ids expired before their audio was stored (each paid again)
  generation_id text,
  generation_model text,
  generation_posted_at timestamptz,
  generations_lost integer not null default 0,
  constraint jobs_audio_to_audio_input
    check (mode <> 'audio-to-audio' or (input_path is not null and length(input_path) between 1 and 1024))
);

-- Serve claim (by id), the expired-lease scan, the due-pending scan, a user's list and job_stats'
-- window by creation.
create index jobs_processing_lease_idx on public.jobs (lease_expires_at) where status = 'processing';
create index jobs_claimable_idx on public.jobs (created_at) where status in ('pending', 'queued');
create index jobs_status_created_idx on public.jobs (status, created_at);
create index jobs_user_idx on public.jobs (user_id, created_at desc);
create index jobs_created_idx on public.jobs (created_at);

-- One row per attempt, so an operator can see why a job failed three times: its outcome, the class
-- of its failure and its step timings, written by the same fenced call that ends it.
create table public.job_attempts (
  job_id uuid not null references public.jobs (id) on delete cascade,
  attempt integer not null,
  lease_token uuid not null,
  started_at timestamptz not null default now(),
  finished_at timestamptz,
  outcome text constraint job_attempts_outcome_check
    check (outcome in ('completed', 'failed', 'released', 'lease_expired', 'stale', 'cancelled', 'paused')),
  error text,
  timings_ms jsonb,
  outcome_class text constraint job_attempts_outcome_class_check check (outcome_class in
    ('provider_permanent', 'provider_transient', 'storage', 'timeout', 'account', 'database', 'internal')),
  primary key (job_id, attempt),
  -- The worker's own record of what it spent (a refund follows it): the attempt passed the last
  -- fence before the provider (advance_stage 'generating'), and a call came back paid for.
  provider_called_at timestamptz,
  provider_paid_at timestamptz
);
-- job_stats reads attempts by start; the ones still running keep an hour from settling.
create index job_attempts_started_idx on public.job_attempts (started_at);
create index job_attempts_open_started_idx on public.job_attempts (started_at) where outcome is null;

-- Row level security: users read and create their own jobs; the worker owns everything else. A
-- table that already has other owners' policies (the plug-in's own-row, admin and showcase ones)
-- keeps them; results stay the worker's whatever they allow (jobs_guard, 20_job_rows.sql).
alter table public.jobs enable row level security;
alter table public.job_attempts enable row level security;

create policy jobs_select_own on public.jobs for select to authenticated
  using ((select auth.uid()) = user_id);
create policy jobs_insert_own on public.jobs for insert to authenticated
  with check ((select auth.uid()) = user_id and status = 'pending');

-- A user may read their rows and name the request columns; anon gets nothing.
revoke all on public.jobs from anon;
revoke insert, update, delete, truncate on public.jobs from authenticated;
grant select on public.jobs to authenticated;
grant insert (id, user_id, prompt, duration, quality, mode, input_path, strength) on public.jobs to authenticated;
revoke all on public.job_attempts from anon, authenticated;
grant all on public.jobs, public.job_attempts to service_role;
