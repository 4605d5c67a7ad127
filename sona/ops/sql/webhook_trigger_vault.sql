-- Sona: the database webhook that sends every new job to process_job, with the shared secret read
-- from Supabase Vault at send time (so it is not stored in the trigger's definition).
-- Same payload as supabase_functions.http_request builds; sent with pg_net, which never retries
-- (reclaim_jobs covers lost deliveries). Timeout {timeout_ms} ms >= JOB_TIMEOUT_MS.
create or replace function {schema}.sona_send_job_webhook() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  secret text;
begin
  select decrypted_secret into secret from vault.decrypted_secrets where name = {vault_name};
  if secret is null then
    raise warning 'sona: Vault secret % is missing; job % was not sent', {vault_name}, new.id;
    return new;
  end if;
  perform net.http_post(
    url := {url},
    body := jsonb_build_object('old_record', null, 'record', to_jsonb(new), 'type', tg_op,
                               'table', tg_table_name, 'schema', tg_table_schema),
    params := '{{}}'::jsonb,
    headers := jsonb_build_object('Content-Type', 'application/json', 'X-Webhook-Secret', secret),
    timeout_milliseconds := {timeout_ms}
  );
  return new;
end $$;

revoke all on function {schema}.sona_send_job_webhook() from public, anon, authenticated;

create or replace trigger sona_process_job
  after insert on {schema}.{table}
  for each row
  execute function {schema}.sona_send_job_webhook();
