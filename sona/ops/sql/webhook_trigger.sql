-- Sona: the database webhook that sends every new job to process_job.
-- Installed in SQL, not in the dashboard: the dashboard caps webhook timeouts at 10 s, and the
-- timeout is {timeout_ms} ms: enough to enqueue (DISPATCH=cloud_tasks), or the whole job (direct).
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
