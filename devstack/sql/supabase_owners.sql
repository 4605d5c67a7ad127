-- Who owns what in a Supabase database, and what `postgres` is granted, applied as the platform's
-- superuser after the stand-ins (issue 25, pg_net 4; Supabase's role dump): auth is
-- supabase_auth_admin's, storage is supabase_storage_admin's, pg_net's request functions are
-- supabase_admin's and the webhook function supabase_functions_admin's. `postgres` may use both
-- schemas, and what it creates in public is granted to the API roles by default, as on Supabase.
-- Never part of a migration.
do $$
begin
  execute format('grant all on database %I to postgres', current_database());
end $$;
grant all on schema public to postgres;
alter default privileges for role postgres in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges for role postgres in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges for role postgres in schema public grant all on sequences to anon, authenticated, service_role;

alter schema auth owner to supabase_auth_admin;
alter table auth.users owner to supabase_auth_admin;
alter function auth.uid() owner to supabase_auth_admin;
grant usage on schema auth to postgres with grant option;
grant all on auth.users to postgres with grant option;
grant execute on function auth.uid() to postgres with grant option;

alter schema storage owner to supabase_storage_admin;
alter table storage.buckets owner to supabase_storage_admin;
alter table storage.objects owner to supabase_storage_admin;
alter function storage.foldername(text) owner to supabase_storage_admin;
grant all on schema storage to postgres;
grant all on storage.buckets, storage.objects to postgres;

do $$
declare
  fn text;
begin
  foreach fn in array array['net.http_get(text, jsonb, jsonb, integer)',
                            'net.http_post(text, jsonb, jsonb, jsonb, integer)',
                            'net.http_delete(text, jsonb, jsonb, integer, jsonb)'] loop
    execute format('alter function %s owner to supabase_admin', fn);
  end loop;
end $$;

-- Supabase's webhook migration: the schema's tables are granted to postgres and the API roles.
grant usage on schema supabase_functions to postgres;
grant all on supabase_functions.hooks to postgres;
grant all on sequence supabase_functions.hooks_id_seq to postgres;
