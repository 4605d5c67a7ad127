-- Sona: the database webhook that sends every new job to process_job.
-- Installed in SQL, not in the dashboard: the dashboard caps webhook timeouts at 10 s, and the
-- connection must stay open for the whole job (timeout {timeout_ms} ms >= JOB_TIMEOUT_MS).
create or replace trigger sona_process_job
  after insert on {schema}.{table}
  for each row
  execute function supabase_functions.http_request(
    {url},
    'POST',
    {headers},
    '{{}}',
    '{timeout_ms}'
  );
