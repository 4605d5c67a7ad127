-- `python -m sona doctor`: grants on this database that let anon or a signed-in user mint or spend
-- tokens, change configuration, or clear the paths of audio files, each with the SQL that closes it.
-- One row per finding: kind, object, roles (who holds it), problem, fix. Read-only.
with api_roles (role) as (values ('anon'), ('authenticated')),
-- Where money and configuration live (the plug-in's token system and welcome bonus, its admins, and
-- this project's limits).
guarded (tbl) as (values ('user_tokens'), ('token_transactions'), ('app_config'), ('admin_users'),
                         ('sona_settings')),
definers as (
  select p.oid, format('public.%I(%s)', p.proname, oidvectortypes(p.proargtypes)) as sig, pg_get_functiondef(p.oid) as body
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace
   where n.nspname = 'public' and p.prosecdef and p.prokind = 'f'
     and p.prorettype <> 'trigger'::regtype  -- a trigger function cannot be called over the API
),
-- A definer function runs as its owner: whoever may execute it writes what it writes.
risky_functions as (
  select d.sig,
         case when d.body ~* '(insert\s+into|update|delete\s+from)\s+(public\.)?(user_tokens|token_transactions)\M'
              then 'mints or spends any user''s tokens'
              when d.body ~* '(insert\s+into|update|delete\s+from)\s+(public\.)?(app_config|admin_users|sona_settings)\M'
              then 'changes configuration'
              when d.body ~* '(master_path|preview_path)\s*=\s*null'
              then 'clears the paths of users'' audio files (their deletion follows)'
         end as problem,
         (select string_agg(r.role, ', ' order by r.role) from api_roles r
           where has_function_privilege(r.role, d.oid, 'execute')) as roles
    from definers d
),
risky_tables as (
  select format('public.%I', c.relname) as tbl,
         (select string_agg(r.role, ', ' order by r.role) from api_roles r
           where has_table_privilege(r.role, c.oid, 'insert, update, delete, truncate')) as roles
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
   where n.nspname = 'public' and c.relkind = 'r' and not c.relrowsecurity
     and c.relname in (select tbl from guarded)
)
select 'function' as kind, f.sig as object, f.roles,
       'SECURITY DEFINER and callable over the API: ' || f.problem as problem,
       format('revoke execute on function %s from public, anon, authenticated;' || E'\n'
              || 'grant execute on function %s to service_role;', f.sig, f.sig) as fix
  from risky_functions f
 where f.problem is not null and f.roles is not null
union all
select 'table', t.tbl, t.roles,
       'row level security is off and the API roles may write it',
       format('alter table %s enable row level security;' || E'\n'
              || 'revoke insert, update, delete, truncate on %s from anon, authenticated;', t.tbl, t.tbl)
  from risky_tables t
 where t.roles is not null
order by 1, 2
