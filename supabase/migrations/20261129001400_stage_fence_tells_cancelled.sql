-- The stage write before generating is the last fence before a paid call. It already matches
-- nothing once the owner has cancelled the job (the cancel clears the lease), so the worker needs no
-- separate lease check: this says which of the two it was. A stale attempt still gets no row; a
-- cancelled job raises SQ003, which the worker reads as "cancelled", never as an error of its own.
-- Idempotent; valid on PostgreSQL 15 and newer.
create or replace function public.advance_stage(p_job_id uuid, p_lease_token uuid, p_stage text)
returns setof public.jobs
language plpgsql volatile security invoker set search_path = '' as $$
begin
  if p_stage not in ('generating', 'encoding', 'uploading') then
    raise exception 'advance_stage: % is not a stage of a running attempt', p_stage
      using errcode = '22023';
  end if;
  return query
  update public.jobs j
     set stage = p_stage
   where j.id = p_job_id and j.status = 'processing' and j.lease_token = p_lease_token
     and public.sona_stage_rank(j.stage) <= public.sona_stage_rank(p_stage)
  returning j.*;
  if not found and exists (select from public.jobs j where j.id = p_job_id and j.status = 'cancelled') then
    raise exception 'job % was cancelled by its owner', p_job_id using errcode = 'SQ003';
  end if;
end $$;

revoke all on function public.advance_stage(uuid, uuid, text) from public, anon, authenticated;
grant execute on function public.advance_stage(uuid, uuid, text) to service_role;

-- The worker's separate lease check before paying is gone: the fence above answers it.
drop function if exists public.lease_is_held(uuid, uuid);
