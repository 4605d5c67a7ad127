-- Local stand-ins for pg_net (0.20) and Supabase's supabase_functions.http_request, in the shape a
-- Supabase project has them, so the webhook trigger runs the real code path: the trigger queues a
-- request in net.http_request_queue and the relay (sona/local/relay.py) plays pg_net's background
-- worker, writing each outcome to net._http_response. Written from pg_net's sql/pg_net.sql and
-- Supabase's migration 20240822021428_enable_webhooks_by_default.sql; never part of a migration.

-- pg_net --------------------------------------------------------------------------------------
create schema if not exists net;

do $$
begin
  if not exists (select from pg_type t join pg_namespace n on n.oid = t.typnamespace
                 where n.nspname = 'net' and t.typname = 'http_method') then
    create domain net.http_method as text
      check (value ilike 'get' or value ilike 'post' or value ilike 'delete');
  end if;
end $$;

-- Unlogged, as in pg_net: a crash loses what is queued (reclaim_jobs covers that).
create unlogged table if not exists net.http_request_queue (
  id bigserial,
  method net.http_method not null,
  url text not null,
  headers jsonb,
  body bytea,
  timeout_milliseconds int not null
);

create unlogged table if not exists net._http_response (
  id bigint,
  status_code integer,
  content_type text,
  headers jsonb,
  content text,
  timed_out bool,
  error_msg text,
  created timestamptz not null default now()
);
create index if not exists _http_response_created_idx on net._http_response (created);

-- pg_net wakes its worker when the inserting transaction commits; NOTIFY is delivered at commit too.
create or replace function net.wake() returns void language sql as $$
  select pg_notify('pg_net_wake', '')
$$;

-- pg_net does these two in C (curl's URL API); the same percent-encoding of unreserved characters.
create or replace function net._urlencode_string(string varchar) returns text
language sql immutable as $$
  select string_agg(
    case when b between 48 and 57 or b between 65 and 90 or b between 97 and 122 or b in (45, 46, 95, 126)
         then chr(b) else '%' || upper(lpad(to_hex(b), 2, '0')) end,
    '' order by i)
  from (select i, get_byte(convert_to(string, 'UTF8'), i) as b
        from generate_series(0, octet_length(convert_to(string, 'UTF8')) - 1) i) bytes
$$;

create or replace function net._encode_url_with_params_array(url text, params_array text[]) returns text
language sql immutable as $$
  select case when cardinality(params_array) = 0 then url
              else url || case when position('?' in url) > 0 then '&' else '?' end
                       || array_to_string(params_array, '&') end
$$;

create or replace function net.http_get(
  url text,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{}'::jsonb,
  timeout_milliseconds int default 5000
) returns bigint language plpgsql as $$
declare
  request_id bigint;
  query text[];
begin
  select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into query from jsonb_each_text(params);
  insert into net.http_request_queue (method, url, headers, timeout_milliseconds)
  values ('GET', net._encode_url_with_params_array(url, query), headers, timeout_milliseconds)
  returning id into request_id;
  perform net.wake();
  return request_id;
end $$;

create or replace function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds int default 5000
) returns bigint language plpgsql as $$
declare
  request_id bigint;
  query text[];
  content_type text;
begin
  select value into content_type from jsonb_each_text(coalesce(headers, '{}'::jsonb))
   where lower(key) = 'content-type' limit 1;
  -- As pg_net: a missing Content-Type is added; any other than exactly application/json fails the
  -- caller's statement (for a webhook: the INSERT that fired it).
  if content_type is null then
    headers := headers || '{"Content-Type": "application/json"}'::jsonb;
  elsif content_type <> 'application/json' then
    raise exception 'Content-Type header must be "application/json"';
  end if;
  select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into query from jsonb_each_text(params);
  insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds)
  values ('POST', net._encode_url_with_params_array(url, query), headers,
          convert_to(body::text, 'UTF8'), timeout_milliseconds)
  returning id into request_id;
  perform net.wake();
  return request_id;
end $$;

-- pg_net's own grants: every role may read and write its tables, queued headers included.
grant usage on schema net to public;
grant all on all sequences in schema net to public;
grant all on all tables in schema net to public;
grant execute on function net.http_get(text, jsonb, jsonb, int) to public;
grant execute on function net.http_post(text, jsonb, jsonb, jsonb, int) to public;

-- supabase_functions ----------------------------------------------------------------------------
create schema if not exists supabase_functions;
grant usage on schema supabase_functions to anon, authenticated, service_role;

-- An audit row per webhook call; Supabase never cleans it up.
create table if not exists supabase_functions.hooks (
  id bigserial primary key,
  hook_table_id integer not null,
  hook_name text not null,
  created_at timestamptz not null default now(),
  request_id bigint
);
create index if not exists supabase_functions_hooks_request_id_idx
  on supabase_functions.hooks using btree (request_id);
create index if not exists supabase_functions_hooks_h_table_id_h_name_idx
  on supabase_functions.hooks using btree (hook_table_id, hook_name);

-- Trigger arguments: url, method, headers (json), params (json), timeout (ms), as the dashboard
-- writes them; the text 'null' counts as missing.
create or replace function supabase_functions.http_request() returns trigger
language plpgsql security definer set search_path = supabase_functions as $$
declare
  request_id bigint;
  url text := tg_argv[0]::text;
  method text := tg_argv[1]::text;
  headers jsonb;
  params jsonb;
  timeout_ms integer;
begin
  if url is null or url = 'null' then
    raise exception 'url argument is missing';
  end if;
  if method is null or method = 'null' then
    raise exception 'method argument is missing';
  end if;
  headers := case when tg_argv[2] is null or tg_argv[2] = 'null'
                  then '{"Content-Type": "application/json"}'::jsonb else tg_argv[2]::jsonb end;
  params := case when tg_argv[3] is null or tg_argv[3] = 'null' then '{}'::jsonb else tg_argv[3]::jsonb end;
  timeout_ms := case when tg_argv[4] is null or tg_argv[4] = 'null' then 1000 else tg_argv[4]::integer end;

  case method
    when 'GET' then
      request_id := net.http_get(url, params, headers, timeout_ms);
    when 'POST' then
      request_id := net.http_post(
        url,
        jsonb_build_object('old_record', old, 'record', new, 'type', tg_op,
                           'table', tg_table_name, 'schema', tg_table_schema),
        params, headers, timeout_ms);
    else
      raise exception 'method argument % is invalid', method;
  end case;

  insert into supabase_functions.hooks (hook_table_id, hook_name, request_id)
  values (tg_relid, tg_name, request_id);
  return new;
end $$;

revoke all on function supabase_functions.http_request() from public;
grant execute on function supabase_functions.http_request() to anon, authenticated, service_role;
