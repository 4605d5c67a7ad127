"""PostgREST's RPC endpoint, as the local gateway serves it: POST /rest/v1/rpc/<function> with named
JSON arguments, answered the way PostgREST answers (a set-returning function gives an array, errors
give {"code","details","hint","message"} with PostgREST's status for the SQLSTATE)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool
from werkzeug.wrappers import Request, Response

from devstack.serving import json_response


@dataclass
class _Function:
    args: list[tuple[str, str]]  # (name, type) in declaration order
    returns_set: bool
    returns_void: bool
    returns_composite: bool


class PostgrestRpc:
    def __init__(self, pool: ConnectionPool, schema: str) -> None:
        self._pool = pool
        self.schema = schema
        self._functions: dict[str, list[_Function]] = {}

    def _lookup(self, name: str) -> list[_Function]:
        if name in self._functions:
            return self._functions[name]
        query = """
            select coalesce(p.proargnames[1:p.pronargs], '{}') as names,
                   array(select format_type(t, null) from unnest(p.proargtypes::oid[]) t) as types,
                   p.proretset, p.prorettype = 'void'::regtype,
                   coalesce(rt.typtype = 'c', false)
              from pg_proc p join pg_namespace n on n.oid = p.pronamespace
              left join pg_type rt on rt.oid = p.prorettype
             where n.nspname = %s and p.proname = %s and p.prokind = 'f'"""
        with self._pool.connection() as conn:
            rows = conn.execute(query, (self.schema, name)).fetchall()
            conn.rollback()
        found = [_Function(list(zip(r[0], r[1], strict=True)), r[2], r[3], r[4]) for r in rows]
        if found:
            self._functions[name] = found
        return found

    def handle(
        self, name: str, request: Request, role: str, claims: dict[str, Any] | None = None
    ) -> Response:
        if request.method not in ("POST", "GET"):
            return _pgrst_error(405, "PGRST117", f"Unsupported HTTP method: {request.method}")
        try:
            params = request.get_json(force=True, silent=False) if request.data else {}
        except Exception:
            return _pgrst_error(400, "PGRST102", "Empty or invalid json")
        if not isinstance(params, dict):
            return _pgrst_error(400, "PGRST102", "Empty or invalid json")
        given = set(params)
        match = next((f for f in self._lookup(name) if {a for a, _ in f.args} == given), None)
        if match is None:
            names = ", ".join(sorted(given))
            return _pgrst_error(
                404,
                "PGRST202",
                f"Could not find the function {self.schema}.{name}({names}) in the schema cache",
                f"Searched for the function {self.schema}.{name} with parameters {names} or with "
                "a single unnamed json/jsonb parameter, but no matches were found in the schema cache.",
                None,
            )
        return self._call(name, match, params, role, claims or {"role": role})

    def _call(
        self, name: str, fn: _Function, params: dict[str, Any], role: str, claims: dict[str, Any]
    ) -> Response:
        record = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(a), sql.SQL(t)) for a, t in fn.args
        )
        named = sql.SQL(", ").join(
            sql.SQL("{} := _a.{}").format(sql.Identifier(a), sql.Identifier(a)) for a, _ in fn.args
        )
        call = sql.SQL("{}.{}({})").format(sql.Identifier(self.schema), sql.Identifier(name), named)
        source = sql.SQL("from json_to_record(%s::json) as _a({})").format(record) if fn.args else sql.SQL("")
        if fn.returns_set or fn.returns_composite:
            agg = "coalesce(json_agg(_r), '[]'::json)" if fn.returns_set else "row_to_json(_r)"
            joiner = ", lateral" if fn.args else "from"
            query = sql.SQL("select " + agg + " {} " + joiner + " {} as _r").format(source, call)
        else:
            query = sql.SQL("select to_json({}) {}").format(call, source)
        try:
            row = self._run_as(role, claims, query, (json.dumps(params),) if fn.args else None)
        except psycopg.Error as exc:
            return _database_error(exc, role)
        if fn.returns_void:
            return Response(status=204)
        return json_response(row[0] if row else None)

    def insert(self, table: str, request: Request, role: str, claims: dict[str, Any]) -> Response:
        """POST /rest/v1/<table>: PostgREST's insert of one object or an array of objects (the
        columns are the keys of the first), as the request's role with its JWT claims. Answers
        201, with the rows when the request says Prefer: return=representation."""
        try:
            body = request.get_json(force=True, silent=False)
        except Exception:
            return _pgrst_error(400, "PGRST102", "Empty or invalid json")
        rows = body if isinstance(body, list) else [body]
        if not rows or not all(isinstance(r, dict) for r in rows):
            return _pgrst_error(400, "PGRST102", "Empty or invalid json")
        columns = list(rows[0])
        target = sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(table))
        names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        query = sql.SQL(
            "with ins as (insert into {t} ({n}) select {n} from json_populate_recordset(null::{t}, %s::json)"
            " returning *) select coalesce(json_agg(ins), '[]'::json) from ins"
        ).format(t=target, n=names)
        try:
            row = self._run_as(role, claims, query, (json.dumps(rows),))
        except psycopg.Error as exc:
            return _database_error(exc, role)
        if "return=representation" in request.headers.get("Prefer", ""):
            return json_response(row[0] if row else [], 201)
        return Response(status=201)

    def _run_as(
        self, role: str, claims: dict[str, Any], query: sql.Composed, params: tuple[Any, ...] | None
    ) -> tuple[Any, ...] | None:
        """One transaction as PostgREST runs a request: the role, then the JWT's claims."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
            conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
            row: tuple[Any, ...] | None = conn.execute(query, params).fetchone()
            return row


def _database_error(exc: psycopg.Error, role: str) -> Response:
    diag = exc.diag
    return _pgrst_error(
        http_status(exc.sqlstate, anonymous=role == "anon"),
        exc.sqlstate or "XX000",
        diag.message_primary or str(exc),
        diag.message_detail,
        diag.message_hint,
    )


def _pgrst_error(
    status: int, code: str, message: str, details: str | None = None, hint: str | None = None
) -> Response:
    return json_response({"code": code, "details": details, "hint": hint, "message": message}, status)


def http_status(sqlstate: str | None, *, anonymous: bool = False) -> int:
    code = sqlstate or ""
    exact = {
        "P0001": 400,
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "42883": 404,
        "42P01": 404,
        "42P17": 500,
        "42501": 401 if anonymous else 403,
        "40001": 409,
        "40P01": 409,
        "57014": 500,
    }
    if code in exact:
        return exact[code]
    by_class = {
        "08": 503,
        "09": 500,
        "0L": 403,
        "0P": 403,
        # no "23" class: only 23503 and 23505 are 409; a check or not-null violation is 400
        "25": 500,
        "28": 403,
        "2D": 500,
        "38": 500,
        "39": 500,
        "3B": 500,
        "40": 500,
        "53": 503,
        "54": 500,
        "55": 500,
        "57": 500,
        "58": 500,
        "F0": 500,
        "HV": 500,
        "P0": 500,
        "XX": 500,
    }
    return by_class.get(code[:2], 400)
