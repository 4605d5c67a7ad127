"""The plug-in's `generate` over SQL, beside its replay through the local gateway
(devstack/plugin_generate.py, which holds the facts read in generate/index.ts and the pricing)."""

from __future__ import annotations

import uuid

import psycopg

from devstack.plugin_generate import GenerateAnswer, GenerateRequest, generate_through_gateway, js_json
from tests.support import connect

__all__ = ["GenerateRequest", "generate_over_sql", "generate_through_gateway"]


def generate_over_sql(url: str, user_id: uuid.UUID, request: GenerateRequest) -> GenerateAnswer:
    """The same calls over SQL as service_role, each its own transaction as PostgREST runs them."""
    cost = request.cost()
    with connect(url, "service_role") as conn:
        enough = conn.execute("select public.check_user_tokens(%s, %s) as ok", (user_id, cost)).fetchone()
    if not (enough and enough["ok"]):
        return GenerateAnswer(402, error={"code": "INSUFFICIENT_TOKENS", "required": cost})
    with connect(url, "service_role") as conn:
        done = conn.execute(
            "select public.use_tokens(%s, %s, %s) as ok", (user_id, cost, request.description())
        ).fetchone()
    if not (done and done["ok"]):
        return GenerateAnswer(500, error={"message": "Could not deduct tokens"})
    row = request.job_record(user_id)
    names = ", ".join(row)
    try:
        with connect(url, "service_role") as conn:
            job = conn.execute(
                f"insert into public.jobs ({names}) select {names}"  # type: ignore[arg-type]
                " from json_populate_record(null::public.jobs, %s::json) returning *",
                (js_json(row),),
            ).fetchone()
    except psycopg.Error as exc:
        return GenerateAnswer(500, tokens_charged=cost, error={"code": exc.sqlstate, "message": str(exc)})
    return GenerateAnswer(201, job=dict(job) if job else None, tokens_charged=cost)
