"""PostgREST's RPC endpoint, as the local gateway serves it: POST /rest/v1/rpc/<function> with named
JSON arguments, answered the way PostgREST answers (a set-returning function gives an array, errors
give {"code","details","hint","message"} with PostgREST's status for the SQLSTATE; a singular
Accept takes one row of a set-returning function, PGRST116 otherwise)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool
from werkzeug.wrappers import Request, Response

from devstack.emulators.postgrest_wire import (
    PostgrestError,
    Shape,
    from_database,
    json_answer,
    run_as,
    singular_error,
    wanted_shape,
)


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
        try:
            return self._handle(name, request, role, claims or {"role": role})
        except PostgrestError as error:
            return error.response()
        except psycopg.Error as exc:
            return from_database(exc, role).response()

    def _handle(self, name: str, request: Request, role: str, claims: dict[str, Any]) -> Response:
        if request.method not in ("POST", "GET"):
            raise PostgrestError(405, "PGRST117", f"Unsupported HTTP method: {request.method}")
        shape = wanted_shape(request)
        try:
            params = request.get_json(force=True, silent=False) if request.data else {}
        except Exception:
            params = None
        if not isinstance(params, dict):
            raise PostgrestError(400, "PGRST102", "Empty or invalid json")
        given = set(params)
        match = next((f for f in self._lookup(name) if {a for a, _ in f.args} == given), None)
        if match is None:
            names = ", ".join(sorted(given))
            raise PostgrestError(
                404,
                "PGRST202",
                f"Could not find the function {self.schema}.{name}({names}) in the schema cache",
                f"Searched for the function {self.schema}.{name} with parameters {names} or with "
                "a single unnamed json/jsonb parameter, but no matches were found in the schema cache.",
                None,
            )
        return self._call(name, match, params, role, claims, shape)

    def _call(
        self,
        name: str,
        fn: _Function,
        params: dict[str, Any],
        role: str,
        claims: dict[str, Any],
        shape: Shape,
    ) -> Response:
        record = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(a), sql.SQL(t)) for a, t in fn.args
        )
        named = sql.SQL(", ").join(
            sql.SQL("{} := _a.{}").format(sql.Identifier(a), sql.Identifier(a)) for a, _ in fn.args
        )
        call = sql.SQL("{}.{}({})").format(sql.Identifier(self.schema), sql.Identifier(name), named)
        source = sql.SQL("from json_to_record(%s::json) as _a({})").format(record) if fn.args else sql.SQL("")
        joiner = sql.SQL(", lateral" if fn.args else "from")
        if fn.returns_set:
            # The rows, the first of them, and how many: a singular Accept takes exactly one.
            query = sql.SQL(
                "select coalesce(json_agg(_r), '[]'::json), json_agg(_r) -> 0, count(*) {} {} {} as _r"
            ).format(source, joiner, call)
        elif fn.returns_composite:
            query = sql.SQL("select row_to_json(_r), null, 1 {} {} {} as _r").format(source, joiner, call)
        else:
            query = sql.SQL("select to_json({}), null, 1 {}").format(call, source)
        values = (json.dumps(params),) if fn.args else None

        def work(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(query, values).fetchone()
            if row is not None and fn.returns_set and shape == "object" and row[2] != 1:
                raise singular_error(row[2])  # rolls the call back, as PostgREST does
            return row

        row = run_as(self._pool, role, claims, work)
        if fn.returns_void:
            return Response(status=204)
        body = row[1] if row and fn.returns_set and shape == "object" else (row[0] if row else None)
        return json_answer(json.dumps(body), 200, shape if fn.returns_set else "array")
