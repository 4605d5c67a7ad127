-- A local stand-in for Supabase's supabase_functions.http_request trigger function.
-- It builds the payload exactly as Supabase does (jsonb_build_object of OLD, NEW, TG_OP, ...),
-- but instead of pg_net's queue it writes a local queue that the webhook relay delivers.
create schema if not exists supabase_functions;

create table if not exists supabase_functions.local_queue (
  id bigserial primary key,
  url text not null,
  method text not null,
  headers jsonb not null,
  params jsonb not null,
  body jsonb not null,
  timeout_ms integer not null,
  created_at timestamptz not null default now(),
  taken_at timestamptz,
  status_code integer,
  error text
);

create or replace function supabase_functions.http_request() returns trigger
language plpgsql security definer as $$
declare
  payload jsonb;
  queued_id bigint;
begin
  payload := jsonb_build_object(
    'old_record', old,
    'record', new,
    'type', tg_op,
    'table', tg_table_name,
    'schema', tg_table_schema
  );
  insert into supabase_functions.local_queue (url, method, headers, params, body, timeout_ms)
  values (tg_argv[0], tg_argv[1], coalesce(tg_argv[2], '{}')::jsonb,
          coalesce(tg_argv[3], '{}')::jsonb, payload, coalesce(tg_argv[4], '1000')::integer)
  returning id into queued_id;
  perform pg_notify('sona_webhook', queued_id::text);
  return new;
end $$;
