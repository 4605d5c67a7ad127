"""PostgREST's table endpoint, as the local gateway serves it: GET and HEAD reads, POST inserts,
PATCH updates and DELETE deletes on /rest/v1/<table>, for the query grammar supabase-js's builder
sends. A thin translator: each request becomes one SQL statement of identifiers and bound values,
run as the caller's role with its JWT claims, so the database's grants and row level security
decide what is seen and changed, as they do behind PostgREST. Nothing here knows a policy.

Served: `select` with columns, `*` and `alias:column`; filters eq, neq, gt, gte, lt, lte, like,
ilike, in, is (each may be negated with `not.`); `order` (asc/desc, nullsfirst/nullslast);
`limit`, `offset`; `columns` on insert; `Prefer: return=representation|minimal` and
`count=exact|planned|estimated` (all answered exactly, `Content-Range` on GET and HEAD);
`Accept: application/vnd.pgrst.object+json` (one object, PGRST116 otherwise). Everything else
PostgREST's grammar allows (embedded resources, casts, JSON paths, or/and trees, full-text search,
array and range operators, upserts, CSV) is answered with PostgREST's own error code and a detail
that says it is not served here, never a silent difference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool
from werkzeug.wrappers import Request, Response

from devstack.emulators.postgrest_wire import (
    PostgrestError,
    Preferences,
    Shape,
    check_profile,
    from_database,
    json_answer,
    not_served,
    preferences,
    run_as,
    singular_error,
    wanted_shape,
)

# Query parameters that are not filters (PostgREST's reserved names).
RESERVED = {"select", "order", "limit", "offset", "columns", "on_conflict"}
OPERATORS = {
    "eq": "=",
    "neq": "<>",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "like": "like",
    "ilike": "ilike",
}
IS_OPERANDS = {"null": "null", "true": "true", "false": "false", "unknown": "unknown", "not_null": "not null"}
# A column name as a filter, select item or order item may carry one: anything with these is
# PostgREST syntax beyond a plain column (a referenced table, a cast, a JSON path, an embedding).
_BEYOND_A_COLUMN = re.compile(r"[.()]|::|->|!")
# The rows as PostgREST answers them (json_agg of the row), the first alone, and how many.
_AGGREGATE = "select coalesce(json_agg(_r), '[]')::text, (json_agg(_r) -> 0)::text, count(*) from {}"


@dataclass
class Query:
    """The parts of one request's SQL: the bound values line up with the placeholders of `where`."""

    where: list[sql.Composable] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def where_clause(self) -> sql.Composable:
        if not self.where:
            return sql.SQL("")
        return sql.SQL(" where ") + sql.SQL(" and ").join(self.where)


def column(name: str, what: str) -> sql.Identifier:
    name = name.strip()
    if name.startswith('"') and name.endswith('"') and len(name) > 1:
        name = name[1:-1]
    elif not name or _BEYOND_A_COLUMN.search(name):
        raise not_served(what, f"{name!r} is not a plain column name")
    return sql.Identifier(name)


def split_top(text: str) -> list[str]:
    """Comma-separated items, keeping commas inside double quotes and parentheses."""
    items, depth, quoted, start = [], 0, False, 0
    for i, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        elif not quoted and depth == 0 and char == ",":
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def select_list(text: str | None) -> sql.Composable:
    if text is None or text.strip() in ("", "*"):
        return sql.SQL("*")
    items: list[sql.Composable] = []
    for item in split_top(text):
        item = item.strip()
        if item == "*":
            items.append(sql.SQL("*"))
            continue
        if "::" in item:
            raise not_served("select parameter", f"{item!r} (casts)")
        alias, _, name = item.partition(":") if ":" in item else ("", "", item)
        source = column(name, "select parameter")
        items.append(
            sql.SQL("{} as {}").format(source, column(alias, "select parameter")) if alias else source
        )
    return sql.SQL(", ").join(items)


def add_filter(query: Query, key: str, value: str) -> None:
    if key in ("or", "and", "not.or", "not.and"):
        raise not_served("logic tree", f"{key}={value}")
    target = column(key, "filter")
    negated = value.startswith("not.")
    operator, _, operand = value.removeprefix("not.").partition(".")
    condition: sql.Composable
    if operator in OPERATORS:
        if operator in ("like", "ilike"):
            operand = operand.replace("*", "%")
        condition = sql.SQL("{} " + OPERATORS[operator] + " %s").format(target)
        query.values.append(operand)
    elif operator == "in":
        members = _in_list(operand)
        marks = sql.SQL(", ").join(sql.Placeholder() * len(members))
        condition = sql.SQL("{} in ({})").format(target, marks) if members else sql.SQL("false")
        query.values.extend(members)
    elif operator == "is" and operand.lower() in IS_OPERANDS:
        condition = sql.SQL("{} is " + IS_OPERANDS[operand.lower()]).format(target)
    else:
        raise not_served("filter", f"{key}={value} (served: {', '.join([*OPERATORS, 'in', 'is'])})")
    query.where.append(sql.SQL("not ({})").format(condition) if negated else condition)


def _in_list(operand: str) -> list[str]:
    if not (operand.startswith("(") and operand.endswith(")")):
        raise PostgrestError(400, "PGRST100", f'"failed to parse filter (in.{operand})"')
    inner = operand[1:-1]
    if not inner:
        return []
    return [m.strip()[1:-1] if m.strip().startswith('"') else m.strip() for m in split_top(inner)]


def order_by(text: str | None) -> sql.Composable:
    if not text:
        return sql.SQL("")
    terms: list[sql.Composable] = []
    for item in split_top(text):
        name, *modifiers = item.strip().split(".")
        words = [m for m in modifiers if m in ("asc", "desc")][-1:]
        nulls = {"nullsfirst": "nulls first", "nullslast": "nulls last"}
        if any(m not in ("asc", "desc", *nulls) for m in modifiers):
            raise not_served("order", f"{item} (a column, then asc or desc, then nullsfirst or nullslast)")
        extra = " ".join([*words, *(nulls[m] for m in modifiers if m in nulls)])
        terms.append(sql.SQL("{}" + (" " + extra if extra else "")).format(column(name, "order")))
    return sql.SQL(" order by ") + sql.SQL(", ").join(terms)


def _count(text: str | None, name: str) -> int | None:
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise PostgrestError(400, "PGRST100", f'"failed to parse {name} parameter ({text})"')
    return int(text)


class PostgrestTables:
    def __init__(self, pool: ConnectionPool, schema: str) -> None:
        self._pool = pool
        self.schema = schema

    def handle(self, table: str, request: Request, role: str, claims: dict[str, Any]) -> Response:
        try:
            check_profile(request, self.schema)
            shape = wanted_shape(request)
            prefer = preferences(request)
            query = self._filters(request)
            if prefer.count and request.method not in ("GET", "HEAD"):
                raise PostgrestError(
                    400,
                    "PGRST122",
                    "Invalid preferences given with handling=strict",
                    "Invalid preferences: count on a write (not served by the local gateway)",
                )
            target = sql.Identifier(self.schema, table)
            if request.method in ("GET", "HEAD"):
                return self._read(table, target, request, query, shape, prefer, role, claims)
            if request.method == "POST":
                statement, values = self._insert(target, request)
                return self._write(table, statement, values, request, role, claims, 201)
            if request.method == "PATCH":
                statement, values = self._update(target, request, query)
                return self._write(table, statement, values, request, role, claims, 200)
            if request.method == "DELETE":
                statement = sql.SQL("delete from {}").format(target) + query.where_clause()
                return self._write(table, statement, query.values, request, role, claims, 200)
            raise PostgrestError(405, "PGRST117", f"Unsupported HTTP method: {request.method}")
        except PostgrestError as error:
            return error.response()
        except psycopg.Error as exc:
            return from_database(exc, role).response()

    @staticmethod
    def _filters(request: Request) -> Query:
        query = Query()
        for key, value in request.args.items(multi=True):
            if key not in RESERVED:
                add_filter(query, key, value)
        if request.method not in ("GET", "HEAD") and {"order", "limit", "offset"} & set(request.args):
            raise not_served("modifier", "order, limit and offset on a write")
        if (request.method != "POST" and "columns" in request.args) or "on_conflict" in request.args:
            raise not_served("query parameter", "columns outside an insert, and on_conflict (upserts)")
        return query

    def _exists(self, conn: psycopg.Connection[Any], table: str) -> None:
        """PostgREST's schema cache holds every table and view of the schema, whatever the role may
        read (privileges are the database's answer, 42501)."""
        found = conn.execute(
            "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'v', 'm', 'p', 'f')",
            (self.schema, table),
        ).fetchone()
        if found is None:
            raise PostgrestError(
                404, "PGRST205", f"Could not find the table '{self.schema}.{table}' in the schema cache"
            )

    def _read(
        self,
        table: str,
        target: sql.Composable,
        request: Request,
        query: Query,
        shape: Shape,
        prefer: Preferences,
        role: str,
        claims: dict[str, Any],
    ) -> Response:
        limit = _count(request.args.get("limit"), "limit")
        offset = _count(request.args.get("offset"), "offset") or 0
        page = (
            sql.SQL("select {} from {}").format(select_list(request.args.get("select")), target)
            + query.where_clause()
            + order_by(request.args.get("order"))
            + (sql.SQL(" limit {}").format(sql.Literal(limit)) if limit is not None else sql.SQL(""))
            + (sql.SQL(" offset {}").format(sql.Literal(offset)) if offset else sql.SQL(""))
        )
        statement = sql.SQL(_AGGREGATE).format(sql.SQL("({}) _r").format(page))
        counted = sql.SQL("select count(*) from {}").format(target) + query.where_clause()

        def work(conn: psycopg.Connection[Any]) -> tuple[str, str | None, int, int | None]:
            self._exists(conn, table)
            body, first, rows = _one(conn.execute(statement, query.values))
            total = _one(conn.execute(counted, query.values))[0] if prefer.count else None
            return body, first, rows, total

        body, first, rows, total = run_as(self._pool, role, claims, work)
        if total is not None and offset and offset >= total > 0:
            raise PostgrestError(
                416,
                "PGRST103",
                "Requested range not satisfiable",
                f"An offset of {offset} was requested, but there are only {total} rows.",
            )
        if shape == "object" and rows != 1:
            raise singular_error(rows)
        partial = total is not None and rows < total
        span = f"{offset}-{offset + rows - 1}" if rows and request.method != "HEAD" else "*"
        headers = {"Content-Range": f"{span}/{'*' if total is None else total}"}
        answer = first if shape == "object" else body
        return json_answer(answer or "", 206 if partial else 200, shape, **headers)

    @staticmethod
    def _rows(request: Request) -> list[dict[str, Any]]:
        try:
            body = request.get_json(force=True, silent=False)
        except Exception:
            body = None
        rows = body if isinstance(body, list) else [body]
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise PostgrestError(400, "PGRST102", "Empty or invalid json")
        return rows

    def _insert(self, target: sql.Composable, request: Request) -> tuple[sql.Composable, list[Any]]:
        """PostgREST's insert: the columns are `columns` when given (supabase-js sends them for an
        array) or the first object's keys; a key a row lacks is null, as in PostgREST."""
        rows = self._rows(request)
        given = request.args.get("columns")
        names = [c.strip().strip('"') for c in split_top(given)] if given else list(rows[0])
        columns = sql.SQL(", ").join(column(c, "columns parameter") for c in names)
        statement = sql.SQL(
            "insert into {t} ({c}) select {c} from json_populate_recordset(null::{t}, %s::json)"
        ).format(t=target, c=columns)
        return statement, [json.dumps(rows)]

    def _update(
        self, target: sql.Composable, request: Request, query: Query
    ) -> tuple[sql.Composable, list[Any]]:
        rows = self._rows(request)
        if len(rows) != 1:
            raise PostgrestError(400, "PGRST102", "Empty or invalid json")
        columns = sql.SQL(", ").join(column(c, "update body") for c in rows[0])
        statement = (
            sql.SQL(
                "update {t} set ({c}) = (select {c} from json_populate_record(null::{t}, %s::json))"
            ).format(t=target, c=columns)
            + query.where_clause()
        )
        return statement, [json.dumps(rows[0]), *query.values]

    def _write(
        self,
        table: str,
        statement: sql.Composable,
        values: list[Any],
        request: Request,
        role: str,
        claims: dict[str, Any],
        status: int,
    ) -> Response:
        """One write; RETURNING the `select` columns only with return=representation (RETURNING
        needs the row to be readable, which a minimal write does not). A singular answer that
        does not fit rolls the write back, as PostgREST's does."""
        shape, prefer = wanted_shape(request), preferences(request)
        returning: sql.Composable = sql.SQL(" returning 1")
        if prefer.representation:
            returning = sql.SQL(" returning {}").format(select_list(request.args.get("select")))
        wrapped = sql.SQL("with _r as ({}) ").format(statement + returning) + sql.SQL(_AGGREGATE).format(
            sql.SQL("_r")
        )

        def work(conn: psycopg.Connection[Any]) -> tuple[str, str | None, int]:
            self._exists(conn, table)
            body, first, rows = _one(conn.execute(wrapped, values))
            if shape == "object" and rows != 1:
                raise singular_error(rows)
            return body, first, rows

        body, first, _ = run_as(self._pool, role, claims, work)
        if not prefer.representation:
            return Response(status=201 if status == 201 else 204)
        return json_answer((first if shape == "object" else body) or "", status, shape)


def _one(cursor: psycopg.Cursor[Any]) -> Any:
    row = cursor.fetchone()
    assert row is not None  # an aggregate always answers one row
    return row
