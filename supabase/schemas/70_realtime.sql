-- Supabase Realtime pushes each change of a job to the plug-in: its UI subscribes to
-- postgres_changes on its job (and polls every 2 s besides). Realtime sends only what is in the
-- supabase_realtime publication, which a Supabase project has (empty until tables are added) and a
-- plain PostgreSQL has not: jobs joins it where it exists. What a subscriber then receives is
-- decided by its role's row level security and column privileges (README, "Realtime").
do $$ begin
  if exists (select from pg_publication where pubname = 'supabase_realtime')
     and not exists (select from pg_publication_tables
                      where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = 'jobs') then
    alter publication supabase_realtime add table public.jobs;
  end if;
end $$;
