-- Local stand-ins for pg_net (0.20) and Supabase's supabase_functions.http_request, in the shape a
-- Supabase project has them, so the webhook trigger runs the real code path: the trigger queues a
-- request in net.http_request_queue and the relay (devstack/emulators/relay.py) plays pg_net's background
-- worker, writing each outcome to net._http_response. Written from pg_net's sql/pg_net.sql and
-- Supabase's migration 20240822021428_enable_webhooks_by_default.sql; never part of a migration.
-- As measured on a Supabase database (issue 25, pg_net 1 and 2):
-- - net.http_get / http_post (and http_delete) are SECURITY DEFINER with search_path net; EXECUTE
--   is revoked from PUBLIC and granted to supabase_admin, supabase_functions_admin, postgres, anon,
--   authenticated and service_role. pg_net also has http_delete, http_collect_response, the
--   http_response types and its worker functions (worker_restart, wait_until_running, wake).
-- - supabase_functions.hooks can be read, inserted into and deleted from by anon, authenticated and
--   service_role; supabase_functions_admin owns http_request() and the hooks table.
-- Each object is created only where it is missing, so a database that has the real ones keeps them.

-- The roles Supabase's own functions belong to; nothing logs in as them here.
do $$
begin
  if not exists (select from pg_roles where rolname = 'supabase_admin') then
    create role supabase_admin nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'supabase_functions_admin') then
    create role supabase_functions_admin nologin noinherit;
  end if;
end $$;

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
do $do$
begin
if to_regprocedure('net.wake()') is null then
create function net.wake() returns void language sql as $$
  select pg_notify('pg_net_wake', '')
$$;
end if;
end $do$;

-- pg_net does these two in C (curl's URL API); the same percent-encoding of unreserved characters.
do $do$
begin
if to_regprocedure('net._urlencode_string(character varying)') is null then
create function net._urlencode_string(string varchar) returns text
language sql immutable as $$
  select string_agg(
    case when b between 48 and 57 or b between 65 and 90 or b between 97 and 122 or b in (45, 46, 95, 126)
         then chr(b) else '%' || upper(lpad(to_hex(b), 2, '0')) end,
    '' order by i)
  from (select i, get_byte(convert_to(string, 'UTF8'), i) as b
        from generate_series(0, octet_length(convert_to(string, 'UTF8')) - 1) i) bytes
$$;
end if;
end $do$;

do $do$
begin
if to_regprocedure('net._encode_url_with_params_array(text, text[])') is null then
create function net._encode_url_with_params_array(url text, params_array text[]) returns text
language sql immutable as $$
  select case when cardinality(params_array) = 0 then url
              else url || case when position('?' in url) > 0 then '&' else '?' end
                       || array_to_string(params_array, '&') end
$$;
end if;
end $do$;

do $do$
begin
if to_regprocedure('net.http_get(text, jsonb, jsonb, integer)') is null then
create function net.http_get(
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
end if;

if to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)') is null then
create function net.http_post(
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
end if;

if to_regprocedure('net.http_delete(text, jsonb, jsonb, integer, jsonb)') is null then
create function net.http_delete(
  url text,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{}'::jsonb,
  timeout_milliseconds int default 5000,
  body jsonb default null
) returns bigint language plpgsql as $$
declare
  request_id bigint;
  query text[];
begin
  select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into query from jsonb_each_text(params);
  insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds)
  values ('DELETE', net._encode_url_with_params_array(url, query), headers,
          convert_to(body::text, 'UTF8'), timeout_milliseconds)
  returning id into request_id;
  perform net.wake();
  return request_id;
end $$;
end if;
end $do$;

-- pg_net's result types.
do $$
begin
  if to_regtype('net.request_status') is null then
    create type net.request_status as enum ('PENDING', 'SUCCESS', 'ERROR');
  end if;
  if to_regtype('net.http_response') is null then
    create type net.http_response as (status_code integer, headers jsonb, body text);
  end if;
  if to_regtype('net.http_response_result') is null then
    create type net.http_response_result as
      (status net.request_status, message text, response net.http_response);
  end if;
end $$;

-- Waiting for and reading a response, as pg_net's functions of these names do.
do $do$
begin
if to_regprocedure('net._await_response(bigint)') is null then
create function net._await_response(request_id bigint) returns bool language plpgsql as $$
begin
  while not exists (select from net._http_response r where r.id = request_id) loop
    perform pg_sleep(0.05);
  end loop;
  return true;
end $$;
end if;

if to_regprocedure('net._http_collect_response(bigint, boolean)') is null then
create function net._http_collect_response(request_id bigint, async bool default true)
returns net.http_response_result language plpgsql as $$
declare
  rec net._http_response;
begin
  if not async then
    perform net._await_response(request_id);
  end if;
  select * into rec from net._http_response r where r.id = request_id;
  if rec is null or rec.error_msg is not null then
    return ('ERROR', coalesce(rec.error_msg, 'request matching request_id not found'), null)
      ::net.http_response_result;
  end if;
  return ('SUCCESS', 'ok', (rec.status_code, rec.headers, rec.content)::net.http_response)
    ::net.http_response_result;
end $$;
end if;

if to_regprocedure('net.http_collect_response(bigint, boolean)') is null then
create function net.http_collect_response(request_id bigint, async bool default true)
returns net.http_response_result language plpgsql as $$
begin
  raise notice 'The net.http_collect_response function is deprecated.';
  return net._http_collect_response(request_id, async);
end $$;
end if;

-- The worker's functions. The relay connects as application_name 'pg_net worker'; restarting it
-- is not played (the relay reconnects by itself), so worker_restart only wakes it.
if to_regprocedure('net.check_worker_is_up()') is null then
create function net.check_worker_is_up() returns void language plpgsql as $$
begin
  if not exists (select from pg_stat_activity where application_name = 'pg_net worker') then
    raise exception 'the pg_net background worker is not up';
  end if;
end $$;
end if;

if to_regprocedure('net.wait_until_running()') is null then
create function net.wait_until_running() returns void language plpgsql as $$
begin
  while not exists (select from pg_stat_activity where application_name = 'pg_net worker') loop
    perform pg_sleep(0.05);
  end loop;
end $$;
end if;

if to_regprocedure('net.worker_restart()') is null then
create function net.worker_restart() returns bool language sql as $$
  select pg_notify('pg_net_wake', '') is not null
$$;
end if;
end $do$;

-- pg_net's own grants: every role may read and write its tables, queued headers included.
grant usage on schema net to public;
grant all on all sequences in schema net to public;
grant all on all tables in schema net to public;

-- Supabase's: the request functions run as their owner with search_path net, and only these roles
-- (those that exist here) may call them.
do $$
declare
  fn text;
  grantee text;
begin
  foreach fn in array array['net.http_get(text, jsonb, jsonb, integer)',
                            'net.http_post(text, jsonb, jsonb, jsonb, integer)',
                            'net.http_delete(text, jsonb, jsonb, integer, jsonb)'] loop
    execute format('alter function %s security definer set search_path = net', fn);
    execute format('revoke all on function %s from public', fn);
    foreach grantee in array array['supabase_admin', 'supabase_functions_admin', 'postgres', 'anon',
                                   'authenticated', 'service_role'] loop
      if exists (select from pg_roles where rolname = grantee) then
        execute format('grant execute on function %s to %I', fn, grantee);
      end if;
    end loop;
  end loop;
end $$;

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
do $do$
begin
if to_regprocedure('supabase_functions.http_request()') is null then
create function supabase_functions.http_request() returns trigger
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
-- Supabase's owner, where this session may hand it over (a superuser, or a member of the role);
-- otherwise whoever ran this keeps it, and the function still runs as its owner.
if pg_has_role('supabase_functions_admin', 'member')
   or (select rolsuper from pg_roles where rolname = current_user) then
  alter function supabase_functions.http_request() owner to supabase_functions_admin;
  alter table supabase_functions.hooks owner to supabase_functions_admin;
end if;
end if;
end $do$;

grant usage on schema supabase_functions to supabase_functions_admin;
revoke all on function supabase_functions.http_request() from public;
grant execute on function supabase_functions.http_request() to anon, authenticated, service_role;
-- Supabase's default privileges on the schema reach the API roles (issue 25, pg_net 2).
grant select, insert, delete on supabase_functions.hooks to anon, authenticated, service_role;
grant usage, select on sequence supabase_functions.hooks_id_seq to anon, authenticated, service_role;
