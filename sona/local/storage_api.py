"""Supabase Storage's endpoints, as the local gateway serves them: buckets, uploads (with x-upsert),
list, info, public and signed downloads. Object bytes live in a folder, metadata in PostgreSQL's
storage schema; errors answer HTTP 400 with the original status as a string, as Storage does."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import mimetypes
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from werkzeug.formparser import parse_form_data
from werkzeug.wrappers import Request, Response

from sona.local.serving import json_response


def _storage_error(status: str, error: str, message: str, http: int = 400) -> Response:
    # Supabase Storage answers 400 and carries the original status as a string.
    return json_response({"statusCode": status, "error": error, "message": message}, http)


def access_denied(message: str) -> Response:
    """Storage's AccessDenied (a JWT it cannot verify, or row level security): HTTP 400, "403"."""
    return json_response(
        {"statusCode": "403", "code": "AccessDenied", "error": "Unauthorized", "message": message}, 400
    )


# What row level security does to a key without the service role: storage.buckets and
# storage.objects have RLS on and this project adds no policies, so writes are refused and reads
# see no rows (as the real server answers once its query comes back empty).
_RLS_GUARDED = {
    "storage:bucket_create",
    "storage:upload",
    "storage:update",
    "storage:list",
    "storage:bucket_get",
    "storage:info",
    "storage:sign",
    "storage:download",
}


def _row_level_security(route: str) -> Response:
    if route in ("storage:bucket_create", "storage:upload", "storage:update"):
        return access_denied("new row violates row-level security policy")
    if route == "storage:list":
        return json_response([])
    if route == "storage:bucket_get":
        return _storage_error("404", "Bucket not found", "Bucket not found")
    return _storage_error("404", "not_found", "Object not found")


class StorageApi:
    def __init__(self, pool: ConnectionPool, storage_dir: Path, jwt_secret: str) -> None:
        self._pool = pool
        self.storage_dir = storage_dir
        self.jwt_secret = jwt_secret

    @staticmethod
    def route(request: Request) -> str:
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

    def handle(self, route: str, request: Request, role: str) -> Response:
        if role != "service_role" and route in _RLS_GUARDED:
            return _row_level_security(route)
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

    def _read(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """A read-only query (the pool ends its transaction when the connection goes back)."""
        with self._pool.connection() as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def _read_one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        rows = self._read(query, params)
        return rows[0] if rows else None

    def _bucket(self, bucket_id: str) -> dict[str, Any] | None:
        row = self._read_one(
            "select id, name, public, file_size_limit, allowed_mime_types, created_at, updated_at"
            " from storage.buckets where id = %s",
            (bucket_id,),
        )
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
        return json_response(bucket)

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
        return json_response({"name": bucket_id})

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
        return json_response({"Key": f"{bucket_id}/{name}", "Id": str(row[0])})

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
        rows = self._read(
            "select id, name, metadata, created_at, updated_at from storage.objects"  # type: ignore[arg-type]
            f" where bucket_id = %s and name like %s order by name {order} limit %s offset %s",
            (bucket_id, pattern, int(body.get("limit") or 100), int(body.get("offset") or 0)),
        )
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
        return json_response(items)

    def _info(self, bucket_id: str, name: str) -> Response:
        row = self._read_one(
            "select id, metadata, user_metadata, created_at, updated_at from storage.objects"
            " where bucket_id = %s and name = %s",
            (bucket_id, name),
        )
        if row is None:
            return _storage_error("404", "not_found", "Object not found")
        oid, meta, user_meta, created, updated = row
        meta = meta or {}
        return json_response(
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
        row = self._read_one(
            "select metadata from storage.objects where bucket_id = %s and name = %s",
            (bucket_id, name),
        )
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
        row = self._read_one(
            "select 1 from storage.objects where bucket_id = %s and name = %s",
            (bucket_id, name),
        )
        if row is None:
            return _storage_error("404", "not_found", "Object not found")
        token = self._token(f"{bucket_id}/{name}", int(time.time()) + expires_in)
        return json_response({"signedURL": f"/object/sign/{bucket_id}/{name}?token={token}"})

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
