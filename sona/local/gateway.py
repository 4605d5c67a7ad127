"""The local Supabase gateway: PostgREST's RPC endpoint and the Storage endpoints the function uses.

Backed by a real PostgreSQL (RPC, bucket and object metadata) and a folder (object bytes). It answers
with the real services' status codes and error bodies, so supabase-py cannot tell the difference for
the calls this project makes. Tests can inject faults per route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import mimetypes
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool
from werkzeug.formparser import parse_form_data
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from sona.local.postgrest_errors import http_status
from sona.local.serving import serve_in_thread, stop_server


def make_jwt(secret: str, role: str, ttl_s: int = 10 * 365 * 24 * 3600) -> str:
    """An HS256 JWT shaped like Supabase's API keys (the gateway compares them verbatim)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    now = int(time.time())
    payload = b64(json.dumps({"iss": "sona-local", "role": role, "iat": now, "exp": now + ttl_s}).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json; charset=utf-8")


def _pgrst_error(
    status: int, code: str, message: str, details: str | None = None, hint: str | None = None
) -> Response:
    return _json({"code": code, "details": details, "hint": hint, "message": message}, status)


def _storage_error(status: str, error: str, message: str, http: int = 400) -> Response:
    # Supabase Storage answers 400 and carries the original status as a string.
    return _json({"statusCode": status, "error": error, "message": message}, http)


@dataclass
class Fault:
    """A canned answer. status 0 is an empty 502 (a dead upstream); `after` does the real work
    first and then answers this instead (the request landed but its answer was lost or wrong);
    `delay_only` waits delay_s and then serves the request normally (a slow upstream)."""

    status: int
    body: Any
    delay_s: float = 0.0
    after: bool = False
    delay_only: bool = False


@dataclass
class FaultPlan:
    """Canned answers a test queues per route ("rpc:claim_job", "storage:upload", ...)."""

    queued: dict[str, deque[Fault]] = field(default_factory=lambda: defaultdict(deque))
    down: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self,
        route: str,
        status: int,
        body: Any,
        times: int = 1,
        delay_s: float = 0.0,
        *,
        after: bool = False,
        delay_only: bool = False,
    ) -> None:
        with self.lock:
            for _ in range(times):
                self.queued[route].append(Fault(status, body, delay_s, after, delay_only))

    def take(self, route: str) -> Fault | None:
        with self.lock:
            if route in self.down or "*" in self.down:
                return Fault(
                    503,
                    {
                        "code": "PGRST000",
                        "details": "connection refused",
                        "hint": None,
                        "message": "Could not connect with the database",
                    },
                )
            queue = self.queued.get(route)
            return queue.popleft() if queue else None

    def clear(self) -> None:
        with self.lock:
            self.queued.clear()
            self.down.clear()


@dataclass
class _Function:
    args: list[tuple[str, str]]  # (name, type) in declaration order
    returns_set: bool
    returns_void: bool
    returns_composite: bool


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return


class Gateway:
    """WSGI app serving /rest/v1/rpc/* and /storage/v1/*; start() runs it on a loopback port."""

    def __init__(
        self,
        database_url: str,
        storage_dir: Path,
        *,
        service_role_key: str,
        anon_key: str,
        jwt_secret: str,
        schema: str = "public",
    ) -> None:
        self.database_url = database_url
        self.storage_dir = storage_dir
        self.service_role_key = service_role_key
        self.anon_key = anon_key
        self.jwt_secret = jwt_secret
        self.schema = schema
        self.faults = FaultPlan()
        self.counts: dict[str, int] = defaultdict(int)
        self._counts_lock = threading.Lock()
        self._pool = ConnectionPool(
            database_url, min_size=1, max_size=20, open=False, kwargs={"autocommit": False}
        )
        self._functions: dict[str, list[_Function]] = {}
        self._server: BaseWSGIServer | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._pool.open(wait=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._server = make_server(host, port, self, threaded=True, request_handler=_QuietHandler)
        serve_in_thread(self._server, "gateway")
        self.url = f"http://{host}:{self._server.server_port}"
        return self.url

    def stop(self) -> None:
        stop_server(self._server)
        self._server = None
        self._pool.close()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        response = self._dispatch(request)
        return response(environ, start_response)

    def _count(self, route: str) -> None:
        with self._counts_lock:
            self.counts[route] += 1

    # -- routing -----------------------------------------------------------------------------
    def _dispatch(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/rest/v1/rpc/"):
            route = f"rpc:{path.removeprefix('/rest/v1/rpc/')}"
        elif path.startswith("/storage/v1/"):
            route = self._storage_route(request)
        else:
            return _json({"message": "no Route matched with those values"}, 404)
        self._count(route)
        fault = self.faults.take(route)
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.after:
                self._serve_route(route, request)
            if not fault.delay_only:
                if fault.status == 0:
                    return Response("", status=502)
                return _json(fault.body, fault.status)
        return self._serve_route(route, request)

    def _serve_route(self, route: str, request: Request) -> Response:
        role = self._role(request)
        public_read = route in ("storage:public", "storage:signed_get")
        if role is None and not public_read:
            key = request.headers.get("apikey")
            message = "No API key found in request" if not key else "Invalid API key"
            return _json(
                {
                    "message": message,
                    "hint": "Double check your Supabase `anon` or `service_role` API key.",
                },
                401,
            )
        if route.startswith("rpc:"):
            return self._rpc(route.removeprefix("rpc:"), request, role or "anon")
        return self._storage(route, request, role)

    def _role(self, request: Request) -> str | None:
        key = request.headers.get("apikey", "")
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        for candidate in (bearer, key):
            if candidate and hmac.compare_digest(candidate, self.service_role_key):
                return "service_role"
        for candidate in (bearer, key):
            if candidate and hmac.compare_digest(candidate, self.anon_key):
                return "anon"
        return None

    # -- PostgREST RPC -----------------------------------------------------------------------
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

    def _rpc(self, name: str, request: Request, role: str) -> Response:
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
        return self._call(name, match, params, role)

    def _call(self, name: str, fn: _Function, params: dict[str, Any], role: str) -> Response:
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
        claims = json.dumps({"role": role})
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
                conn.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
                row = conn.execute(query, (json.dumps(params),) if fn.args else None).fetchone()
        except psycopg.Error as exc:
            diag = exc.diag
            status = http_status(exc.sqlstate, anonymous=role == "anon")
            return _pgrst_error(
                status,
                exc.sqlstate or "XX000",
                diag.message_primary or str(exc),
                diag.message_detail,
                diag.message_hint,
            )
        if fn.returns_void:
            return Response(status=204)
        return _json(row[0] if row else None)

    # -- Storage -----------------------------------------------------------------------------
    @staticmethod
    def _storage_route(request: Request) -> str:
        parts = request.path.removeprefix("/storage/v1/").split("/")
        if parts[0] == "bucket":
            return "storage:bucket_create" if request.method == "POST" else "storage:bucket_get"
        if parts[:2] == ["object", "public"]:
            return "storage:public"
        if parts[:2] == ["object", "sign"]:
            return "storage:sign" if request.method == "POST" else "storage:signed_get"
        if parts[:2] == ["object", "list"]:
            return "storage:list"
        if parts[:2] == ["object", "info"]:
            return "storage:info"
        if parts[0] == "object":
            return {"POST": "storage:upload", "PUT": "storage:update"}.get(request.method, "storage:download")
        return "storage:unknown"

    def _storage(self, route: str, request: Request, role: str | None) -> Response:
        parts = request.path.removeprefix("/storage/v1/").split("/")
        if route == "storage:bucket_get":
            return self._bucket_get(parts[1] if len(parts) > 1 else "")
        if route == "storage:bucket_create":
            return self._bucket_create(request)
        if route in ("storage:upload", "storage:update"):
            return self._upload(parts[1], "/".join(parts[2:]), request, route == "storage:update")
        if route == "storage:public":
            return self._serve(parts[2], "/".join(parts[3:]), require_public=True)
        if route == "storage:sign":
            return self._sign(parts[2], "/".join(parts[3:]), request)
        if route == "storage:signed_get":
            return self._serve_signed(parts[2], "/".join(parts[3:]), request)
        if route == "storage:list":
            return self._list(parts[2], request)
        if route == "storage:info":
            skip = 3 if parts[2] == "authenticated" else 2
            return self._info(parts[skip], "/".join(parts[skip + 1 :]))
        if route == "storage:download":
            return self._serve(
                parts[2] if parts[1] == "authenticated" else parts[1],
                "/".join(parts[3:] if parts[1] == "authenticated" else parts[2:]),
                require_public=False,
            )
        return _storage_error("404", "not_found", "Route not found", 404)

    def _bucket(self, bucket_id: str) -> dict[str, Any] | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "select id, name, public, file_size_limit, allowed_mime_types, created_at, updated_at"
                " from storage.buckets where id = %s",
                (bucket_id,),
            ).fetchone()
            conn.rollback()
        if row is None:
            return None
        keys = (
            "id",
            "name",
            "public",
            "file_size_limit",
            "allowed_mime_types",
            "created_at",
            "updated_at",
        )
        bucket = dict(zip(keys, row, strict=True))
        bucket["owner"] = ""
        bucket["created_at"] = bucket["created_at"].isoformat()
        bucket["updated_at"] = bucket["updated_at"].isoformat()
        return bucket

    def _bucket_get(self, bucket_id: str) -> Response:
        bucket = self._bucket(bucket_id)
        if bucket is None:
            return _storage_error("404", "Bucket not found", "Bucket not found")
        return _json(bucket)

    def _bucket_create(self, request: Request) -> Response:
        body = request.get_json(force=True, silent=True) or {}
        bucket_id = body.get("id") or body.get("name")
        if not bucket_id:
            return _storage_error("400", "Invalid Input", "body must have required property 'name'")
        try:
            with self._pool.connection() as conn:
                conn.execute(
                    "insert into storage.buckets (id, name, public, file_size_limit, allowed_mime_types)"
                    " values (%s, %s, %s, %s, %s)",
                    (
                        bucket_id,
                        body.get("name") or bucket_id,
                        bool(body.get("public")),
                        _size_limit(body.get("file_size_limit")),
                        body.get("allowed_mime_types"),
                    ),
                )
                conn.commit()
        except psycopg.errors.UniqueViolation:
            return _storage_error("409", "Duplicate", "The resource already exists")
        return _json({"name": bucket_id})

    def _object_path(self, bucket_id: str, name: str) -> Path:
        path = (self.storage_dir / bucket_id / name).resolve()
        if not path.is_relative_to(self.storage_dir.resolve()) or not name:
            raise ValueError(name)
        return path

    def _upload(self, bucket_id: str, name: str, request: Request, update: bool) -> Response:
        bucket = self._bucket(bucket_id)
        if bucket is None:
            return _storage_error("404", "Bucket not found", "Bucket not found")
        try:
            target = self._object_path(bucket_id, name)
        except ValueError:
            return _storage_error("400", "InvalidKey", f"Invalid key: {name}")
        try:
            content_type, cache_control, data, user_metadata = _upload_body(request)
        except ValueError:
            return _storage_error("400", "InvalidRequest", "metadata must be JSON")
        limit = bucket["file_size_limit"]
        if limit is not None and len(data) > limit:
            return _storage_error(
                "413", "Payload too large", "The object exceeded the maximum allowed size", 400
            )
        allowed = bucket["allowed_mime_types"]
        if allowed and not any(_mime_matches(content_type, m) for m in allowed):
            return _storage_error("415", "invalid_mime_type", f"mime type {content_type} is not supported")
        upsert = request.headers.get("x-upsert", "false").lower() == "true"
        metadata = json.dumps(
            {
                "mimetype": content_type,
                "size": len(data),
                "cacheControl": f"max-age={cache_control}",
                "eTag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"',
            }
        )
        params = {
            "b": bucket_id,
            "n": name,
            "m": metadata,
            "u": json.dumps(user_metadata) if user_metadata is not None else None,
        }
        if update:
            statement = (
                "update storage.objects set metadata = %(m)s, user_metadata = %(u)s,"
                " updated_at = now() where bucket_id = %(b)s and name = %(n)s returning id"
            )
        else:
            statement = (
                "insert into storage.objects (bucket_id, name, metadata, user_metadata)"
                " values (%(b)s, %(n)s, %(m)s, %(u)s) on conflict (bucket_id, name) do "
                + (
                    "update set metadata = excluded.metadata, user_metadata ="
                    " excluded.user_metadata, updated_at = now()"
                    if upsert
                    else "nothing"
                )
                + " returning id"
            )
        with self._pool.connection() as conn:
            row = conn.execute(statement, params).fetchone()  # type: ignore[arg-type]
            if row is None:
                conn.rollback()
                if update:
                    return _storage_error("404", "not_found", "Object not found")
                return _storage_error("409", "Duplicate", "The resource already exists")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            tmp.replace(target)
            conn.commit()
        assert row is not None
        return _json({"Key": f"{bucket_id}/{name}", "Id": str(row[0])})

    def _list(self, bucket_id: str, request: Request) -> Response:
        """POST /object/list/{bucket}: the objects directly in `prefix` whose names start with
        `search` (Storage's own semantics), newest first when sorted by name desc."""
        if self._bucket(bucket_id) is None:
            return _storage_error("404", "Bucket not found", "Bucket not found")
        body = request.get_json(force=True, silent=True) or {}
        prefix = str(body.get("prefix") or "").strip("/")
        folder = f"{prefix}/" if prefix else ""
        pattern = folder + str(body.get("search") or "").replace("%", r"\%").replace("_", r"\_") + "%"
        order = "desc" if (body.get("sortBy") or {}).get("order") == "desc" else "asc"
        with self._pool.connection() as conn:
            rows = conn.execute(
                "select id, name, metadata, created_at, updated_at from storage.objects"  # type: ignore[arg-type]
                f" where bucket_id = %s and name like %s order by name {order} limit %s offset %s",
                (bucket_id, pattern, int(body.get("limit") or 100), int(body.get("offset") or 0)),
            ).fetchall()
            conn.rollback()
        items = [
            {
                "name": name[len(folder) :],
                "id": str(oid),
                "metadata": meta,
                "created_at": created.isoformat(),
                "updated_at": updated.isoformat(),
                "last_accessed_at": updated.isoformat(),
            }
            for oid, name, meta, created, updated in rows
            if "/" not in name[len(folder) :]
        ]
        return _json(items)

    def _info(self, bucket_id: str, name: str) -> Response:
        with self._pool.connection() as conn:
            row = conn.execute(
                "select id, metadata, user_metadata, created_at, updated_at from storage.objects"
                " where bucket_id = %s and name = %s",
                (bucket_id, name),
            ).fetchone()
            conn.rollback()
        if row is None:
            return _storage_error("404", "not_found", "Object not found")
        oid, meta, user_meta, created, updated = row
        meta = meta or {}
        return _json(
            {
                "id": str(oid),
                "name": name,
                "bucket_id": bucket_id,
                "size": meta.get("size"),
                "content_type": meta.get("mimetype"),
                "cache_control": meta.get("cacheControl"),
                "etag": meta.get("eTag"),
                "metadata": user_meta,
                "version": str(oid),
                "created_at": created.isoformat(),
                "last_modified": updated.isoformat(),
            }
        )

    def _serve(self, bucket_id: str, name: str, *, require_public: bool) -> Response:
        bucket = self._bucket(bucket_id)
        if bucket is None or (require_public and not bucket["public"]):
            return _storage_error("404", "Bucket not found", "Bucket not found")
        with self._pool.connection() as conn:
            row = conn.execute(
                "select metadata from storage.objects where bucket_id = %s and name = %s",
                (bucket_id, name),
            ).fetchone()
            conn.rollback()
        if row is None:
            return _storage_error("404", "not_found", "Object not found")
        meta = row[0] or {}
        data = self._object_path(bucket_id, name).read_bytes()
        response = Response(data, content_type=meta.get("mimetype", "application/octet-stream"))
        response.headers["Cache-Control"] = meta.get("cacheControl", "no-cache")
        response.headers["ETag"] = meta.get("eTag", "")
        return response

    def _sign(self, bucket_id: str, name: str, request: Request) -> Response:
        body = request.get_json(force=True, silent=True) or {}
        try:
            expires_in = int(str(body.get("expiresIn")))
        except (TypeError, ValueError):
            return _storage_error("400", "InvalidRequest", "expiresIn must be a number")
        with self._pool.connection() as conn:
            row = conn.execute(
                "select 1 from storage.objects where bucket_id = %s and name = %s",
                (bucket_id, name),
            ).fetchone()
            conn.rollback()
        if row is None:
            return _storage_error("404", "not_found", "Object not found")
        token = self._token(f"{bucket_id}/{name}", int(time.time()) + expires_in)
        return _json({"signedURL": f"/object/sign/{bucket_id}/{name}?token={token}"})

    def _token(self, url: str, exp: int) -> str:
        payload = base64.urlsafe_b64encode(json.dumps({"url": url, "exp": exp}).encode()).decode()
        sig = hmac.new(self.jwt_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        return f"{payload}.{sig}"

    def _serve_signed(self, bucket_id: str, name: str, request: Request) -> Response:
        token = request.args.get("token", "")
        payload, _, sig = token.partition(".")
        good = hmac.new(self.jwt_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload.encode()))
        except ValueError:
            claims = {}
        if not hmac.compare_digest(sig, good) or claims.get("url") != f"{bucket_id}/{name}":
            return _storage_error("400", "InvalidSignature", "The signature is invalid")
        if claims.get("exp", 0) < time.time():
            return _storage_error("400", "InvalidJWT", '"exp" claim timestamp check failed')
        return self._serve(bucket_id, name, require_public=False)


def _upload_body(request: Request) -> tuple[str, str, bytes, dict[str, Any] | None]:
    """Storage takes a multipart form with a `file` part (what storage3 sends) or a raw body.
    A `metadata` form field (or x-metadata header, base64 JSON) is the object's user metadata."""
    if request.mimetype == "multipart/form-data":
        _, form, files = parse_form_data(request.environ)
        part = files.get("file")
        data = part.read() if part else b""
        content_type = (part.mimetype if part and part.mimetype else None) or (
            mimetypes.guess_type(request.path)[0] or "text/plain"
        )
        raw_meta = form.get("metadata")
        metadata = json.loads(raw_meta) if raw_meta else None
        return content_type, form.get("cacheControl", "3600"), data, metadata
    cache = request.headers.get("cache-control", "max-age=3600").removeprefix("max-age=")
    header = request.headers.get("x-metadata")
    metadata = json.loads(base64.b64decode(header)) if header else None
    return request.mimetype or "text/plain", cache, request.get_data(), metadata


def _size_limit(value: Any) -> int | None:
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().upper()
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(unit):
            return int(float(text.removesuffix(unit)) * factor)
    return int(text)


def _mime_matches(content_type: str, pattern: str) -> bool:
    if pattern.endswith("/*"):
        return content_type.startswith(pattern[:-1])
    return content_type == pattern
