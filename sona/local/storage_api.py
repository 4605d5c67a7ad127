"""Supabase Storage's endpoints, as the local gateway serves them: buckets, uploads (with x-upsert),
list, info, public and signed downloads. Object bytes live in a folder, metadata in PostgreSQL's
storage schema. What it honours, as measured against the real Storage server (v1.70.6) and read in
its source (supabase/storage, src/internal/errors, src/storage/limits.ts, migrations/tenant):

- errors answer HTTP 400 (500 for server faults) with `{"statusCode": "<status>", "error",
  "message", "code"}`, `code` one of Storage's ErrorCode names;
- a global upload limit (the project's; 50 MB on the Free plan) refuses a bucket whose
  `file_size_limit` is above it with "413" EntityTooLarge, and caps every upload together with the
  bucket's own limit;
- size strings are parsed as Storage does: decimal units (100MB = 10^8 bytes), no space;
- object names and bucket names outside Storage's character set are refused (InvalidKey,
  InvalidBucketName);
- listing a missing bucket answers `[]`; the list search is a case-insensitive prefix match
  (`%` and `_` are literal), sorted by lower-cased name, with folders as rows whose `id` is null;
- public downloads carry the stored Cache-Control, ETag and Last-Modified, answer 304 and Range;
  signed downloads carry `Expires` and no Cache-Control;
- a signed-in user's upload, download, info and delete run as Storage runs them: in a transaction
  with the role `authenticated` and the token's claims (`request.jwt.claims`), so PostgreSQL applies
  the project's policies on storage.objects; a write they refuse is "403" AccessDenied, a row they
  hide is not found. Signing too (the plug-in's createSignedUrl of its own preview); listing stays
  refused for users (no client needs it here).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import mimetypes
import time
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from werkzeug.formparser import parse_form_data
from werkzeug.wrappers import Request, Response

from sona.local.serving import json_response
from sona.storage_rules import is_valid_bucket_name, is_valid_key, parse_file_size

# The Free plan's global upload limit: "50 MB" in the dashboard, 52428800 bytes as Storage's own
# sample configuration (UPLOAD_FILE_SIZE_LIMIT_STANDARD) has it.
FREE_PLAN_UPLOAD_LIMIT = 50 * 1024 * 1024


def _storage_error(status: str, code: str, message: str, error: str | None = None) -> Response:
    """Storage's error body (src/http/error-handler.ts): HTTP 400, or 500 for a server fault, with
    the original status as a string; `error` is the legacy name, else the code again."""
    body = {"statusCode": status, "code": code, "error": error or code, "message": message}
    return json_response(body, 500 if status == "500" else 400)


def _no_such_bucket() -> Response:
    return _storage_error("404", "NoSuchBucket", "Bucket not found", "Bucket not found")


def _no_such_key() -> Response:
    return _storage_error("404", "NoSuchKey", "Object not found", "not_found")


def _duplicate(code: str) -> Response:
    return _storage_error("409", code, "The resource already exists", "Duplicate")


def _too_large() -> Response:
    return _storage_error(
        "413", "EntityTooLarge", "The object exceeded the maximum allowed size", "Payload too large"
    )


def _invalid_bucket_name() -> Response:
    return _storage_error("400", "InvalidBucketName", "Bucket name invalid", "Invalid Input")


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
    "storage:delete",
}
# What a signed-in user's token lets through to the policies on storage.objects.
_POLICY_ROUTES = {
    "storage:upload",
    "storage:update",
    "storage:download",
    "storage:info",
    "storage:delete",
    "storage:sign",
}


def _row_level_security(route: str) -> Response:
    if route in ("storage:bucket_create", "storage:upload", "storage:update"):
        return access_denied("new row violates row-level security policy")
    if route in ("storage:list", "storage:delete"):
        return json_response([])
    if route == "storage:bucket_get":
        return _storage_error("404", "Bucket not found", "Bucket not found")
    return _storage_error("404", "not_found", "Object not found")


class StorageApi:
    def __init__(
        self,
        pool: ConnectionPool,
        storage_dir: Path,
        jwt_secret: str,
        upload_limit: int = FREE_PLAN_UPLOAD_LIMIT,
    ) -> None:
        self._pool = pool
        self.storage_dir = storage_dir
        self.jwt_secret = jwt_secret
        # The project's global upload limit; tests may change it to play another plan.
        self.upload_limit = upload_limit

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
            methods = {"POST": "storage:upload", "PUT": "storage:update", "DELETE": "storage:delete"}
            return methods.get(request.method, "storage:download")
        return "storage:unknown"

    def handle(
        self, route: str, request: Request, role: str, claims: dict[str, Any] | None = None
    ) -> Response:
        """`claims`: a verified user token's; its requests meet the policies on storage.objects."""
        user = claims if role == "authenticated" and claims is not None else None
        if role != "service_role" and route in _RLS_GUARDED and (user is None or route not in _POLICY_ROUTES):
            return _row_level_security(route)
        parts = request.path.removeprefix("/storage/v1/").split("/")
        if route == "storage:delete":
            return self._delete(parts[1], "/".join(parts[2:]), request, user)
        if route == "storage:bucket_get":
            return self._bucket_get(parts[1] if len(parts) > 1 else "")
        if route == "storage:bucket_create":
            return self._bucket_create(request)
        if route in ("storage:upload", "storage:update"):
            return self._upload(parts[1], "/".join(parts[2:]), request, route == "storage:update", user)
        if route == "storage:public":
            return self._serve(parts[2], "/".join(parts[3:]), request, require_public=True)
        if route == "storage:sign":
            return self._sign(parts[2], "/".join(parts[3:]), request, user)
        if route == "storage:signed_get":
            return self._serve_signed(parts[2], "/".join(parts[3:]), request)
        if route == "storage:list":
            return self._list(parts[2], request)
        if route == "storage:info":
            skip = 3 if parts[2] == "authenticated" else 2
            return self._info(parts[skip], "/".join(parts[skip + 1 :]), user)
        if route == "storage:download":
            return self._serve(
                parts[2] if parts[1] == "authenticated" else parts[1],
                "/".join(parts[3:] if parts[1] == "authenticated" else parts[2:]),
                request,
                require_public=False,
                user=user,
            )
        return json_response({"statusCode": "404", "error": "Not Found", "message": "Route not found"}, 404)

    def _read(
        self, query: str, params: tuple[Any, ...], user: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """A read-only query (the pool ends its transaction when the connection goes back)."""
        with self._pool.connection() as conn:
            _scope(conn, user)
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def _read_one(
        self, query: str, params: tuple[Any, ...], user: dict[str, Any] | None = None
    ) -> tuple[Any, ...] | None:
        rows = self._read(query, params, user)
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
            return _no_such_bucket()
        return json_response(bucket)

    def _bucket_create(self, request: Request) -> Response:
        body = request.get_json(force=True, silent=True) or {}
        bucket_id = body.get("id") or body.get("name")
        if not body.get("name"):
            return _storage_error(
                "400", "InvalidRequest", "body must have required property 'name'", "Bad Request"
            )
        if not is_valid_bucket_name(str(body["name"])):
            return _invalid_bucket_name()
        try:
            size_limit = _size_limit(body.get("file_size_limit"))
        except ValueError:
            return _storage_error(
                "400",
                "InvalidRequest",
                "body/file_size_limit must match a schema in anyOf",
                "Bad Request",
            )
        if size_limit is not None and size_limit > self.upload_limit:
            # storage.ts parseMaxSizeLimit: a bucket may not allow more than the project does.
            return _too_large()
        try:
            with self._pool.connection() as conn:
                conn.execute(
                    "insert into storage.buckets (id, name, public, file_size_limit, allowed_mime_types)"
                    " values (%s, %s, %s, %s, %s)",
                    (
                        bucket_id,
                        body.get("name") or bucket_id,
                        bool(body.get("public")),
                        size_limit,
                        body.get("allowed_mime_types"),
                    ),
                )
                conn.commit()
        except psycopg.errors.UniqueViolation:
            return _duplicate("BucketAlreadyExists")
        return json_response({"name": body["name"]})

    def _object_path(self, bucket_id: str, name: str) -> Path:
        path = (self.storage_dir / bucket_id / name).resolve()
        if not path.is_relative_to(self.storage_dir.resolve()) or not name:
            raise ValueError(name)
        return path

    def _upload(
        self, bucket_id: str, name: str, request: Request, update: bool, user: dict[str, Any] | None = None
    ) -> Response:
        if not is_valid_bucket_name(bucket_id):
            return _invalid_bucket_name()
        bucket = self._bucket(bucket_id)
        if bucket is None:
            return _no_such_bucket()
        try:
            content_type, cache_control, data, user_metadata = _upload_body(request)
        except ValueError:
            return _storage_error("400", "InvalidRequest", "metadata must be JSON")
        limit = bucket["file_size_limit"]
        # uploader.ts getStandardMaxFileSizeLimit: the smaller of the bucket's and the project's.
        if len(data) > min(self.upload_limit, limit if limit is not None else self.upload_limit):
            return _too_large()
        allowed = bucket["allowed_mime_types"]
        if allowed and not any(_mime_matches(content_type, m) for m in allowed):
            return _storage_error(
                "415", "InvalidMimeType", f"mime type {content_type} is not supported", "invalid_mime_type"
            )
        try:
            if not is_valid_key(name):
                raise ValueError(name)
            target = self._object_path(bucket_id, name)
        except ValueError:
            return _storage_error("400", "InvalidKey", f"Invalid key: {name}")
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
            _scope(conn, user)
            try:
                row = conn.execute(statement, params).fetchone()  # type: ignore[arg-type]
            except psycopg.errors.InsufficientPrivilege:
                conn.rollback()
                return access_denied("new row violates row-level security policy")
            if row is None:
                conn.rollback()
                if update:
                    return _no_such_key()
                return _duplicate("KeyAlreadyExists")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            tmp.replace(target)
            conn.commit()
        assert row is not None
        return json_response({"Key": f"{bucket_id}/{name}", "Id": str(row[0])})

    def _list(self, bucket_id: str, request: Request) -> Response:
        """POST /object/list/{bucket}, as storage.search (migration 0063) answers it sorted by name:
        the names under `prefix` that start with `search`, compared lower-cased (no wildcards),
        files and folders (id null) in lower-cased name order. A missing bucket lists nothing."""
        if not is_valid_bucket_name(bucket_id):
            return _invalid_bucket_name()
        body = request.get_json(force=True, silent=True) or {}
        prefix = str(body.get("prefix") or "")
        folder = prefix if not prefix or prefix.endswith("/") else f"{prefix}/"
        start = (folder + str(body.get("search") or "")).lower()
        descending = (body.get("sortBy") or {}).get("order") == "desc"
        rows = self._read(
            "select id, name, metadata, created_at, updated_at from storage.objects"
            " where bucket_id = %s and left(lower(name), length(%s)) = %s",
            (bucket_id, start, start),
        )
        rows.sort(key=lambda row: str(row[1]).lower().encode(), reverse=descending)
        items: list[dict[str, Any]] = []
        seen_folders: set[str] = set()
        for oid, name, meta, created, updated in rows:
            rest = name[len(start) :]
            if "/" in rest:  # a deeper object: its folder is listed once, in its place
                sub = name[len(folder) : len(start) + rest.index("/")]
                if sub.lower() not in seen_folders:
                    seen_folders.add(sub.lower())
                    items.append(_folder_row(sub))
                continue
            items.append(
                {
                    "name": name[len(folder) :],
                    "id": str(oid),
                    "metadata": meta,
                    "created_at": created.isoformat(),
                    "updated_at": updated.isoformat(),
                    "last_accessed_at": updated.isoformat(),
                }
            )
        offset = int(body.get("offset") or 0)
        limit = min(int(body.get("limit") or 100), 1500)
        return json_response(items[offset : offset + limit])

    def _info(self, bucket_id: str, name: str, user: dict[str, Any] | None = None) -> Response:
        row = self._read_one(
            "select id, metadata, user_metadata, created_at, updated_at from storage.objects"
            " where bucket_id = %s and name = %s",
            (bucket_id, name),
            user,
        )
        if row is None:
            return _no_such_key()
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

    def _serve(
        self,
        bucket_id: str,
        name: str,
        request: Request,
        *,
        require_public: bool,
        expires: int | None = None,
        user: dict[str, Any] | None = None,
    ) -> Response:
        """renderer.ts: ETag, Last-Modified and Range always; then either the signed URL's Expires
        or the stored Cache-Control (a public or authenticated download), never both."""
        bucket = self._bucket(bucket_id)
        if bucket is None or (require_public and not bucket["public"]):
            return _no_such_bucket()
        row = self._read_one(
            "select metadata, updated_at from storage.objects where bucket_id = %s and name = %s",
            (bucket_id, name),
            user,
        )
        if row is None:
            return _storage_error("404", "NoSuchKey", "The resource was not found", "Not found")
        meta, updated = row[0] or {}, row[1]
        data = self._object_path(bucket_id, name).read_bytes()
        response = Response(data, content_type=meta.get("mimetype", "application/octet-stream"))
        response.headers["ETag"] = meta.get("eTag", "")
        response.last_modified = updated
        if expires is not None:
            response.headers["Expires"] = format_datetime(datetime.fromtimestamp(expires, UTC), usegmt=True)
        elif meta.get("cacheControl"):
            response.headers["Cache-Control"] = meta["cacheControl"]
        return response.make_conditional(request, accept_ranges=True, complete_length=len(data))

    def _delete(self, bucket_id: str, name: str, request: Request, user: dict[str, Any] | None) -> Response:
        """DELETE /object/{bucket} with {"prefixes": [...]} answers the objects it removed (those the
        policies let the caller see and delete); DELETE /object/{bucket}/{name} removes one."""
        if name:
            names = [name]
        else:
            body = request.get_json(force=True, silent=True) or {}
            names = [str(n) for n in body.get("prefixes") or []]
        with self._pool.connection() as conn:
            _scope(conn, user)
            rows = conn.execute(
                "delete from storage.objects where bucket_id = %s and name = any(%s)"
                " returning id, name, bucket_id, metadata, created_at, updated_at",
                (bucket_id, names),
            ).fetchall()
            conn.commit()
        for row in rows:
            with contextlib.suppress(FileNotFoundError, ValueError):
                self._object_path(bucket_id, row[1]).unlink()
        if name:
            if not rows:
                return _no_such_key()
            return json_response({"message": "Successfully deleted"})
        return json_response(
            [
                {"id": str(oid), "name": n, "bucket_id": b, "metadata": meta, "created_at": c.isoformat()}
                for oid, n, b, meta, c, _ in rows
            ]
        )

    def _sign(
        self, bucket_id: str, name: str, request: Request, user: dict[str, Any] | None = None
    ) -> Response:
        """Signing needs read access to the object: a user's token signs only what the policies on
        storage.objects let them select (createSignedUrl on a private bucket, as the plug-in does)."""
        body = request.get_json(force=True, silent=True) or {}
        try:
            expires_in = int(str(body.get("expiresIn")))
        except (TypeError, ValueError):
            return _storage_error("400", "InvalidRequest", "body/expiresIn must be integer", "Bad Request")
        row = self._read_one(
            "select 1 from storage.objects where bucket_id = %s and name = %s",
            (bucket_id, name),
            user,
        )
        if row is None:
            return _no_such_key()
        token = self._token(f"{bucket_id}/{name}", int(time.time()) + expires_in)
        # object.ts signObjectUrl: the path comes back decoded (decodeURI), not percent-encoded.
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
            return _storage_error("400", "InvalidSignature", "Invalid signature")
        if claims.get("exp", 0) < time.time():
            return _storage_error("400", "ExpiredToken", "The provided token has expired.")
        return self._serve(bucket_id, name, request, require_public=False, expires=int(claims["exp"]))


def _scope(conn: psycopg.Connection[Any], user: dict[str, Any] | None) -> None:
    """Run the rest of this transaction as the user, as Storage does for a user's token: the role
    from the token, and its claims where auth.uid() reads them."""
    if user is None:
        return
    conn.execute(
        "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
        " set_config('request.jwt.claim.sub', %s, true), set_config('request.jwt.claim.role', %s, true)",
        (str(user["role"]), json.dumps(user), str(user.get("sub") or ""), str(user["role"])),
    )


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
    """file-size-limit.ts: null, a whole number of bytes, or a size string Storage parses."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        return parse_file_size(value)
    raise ValueError(value)


def _folder_row(name: str) -> dict[str, Any]:
    keys = ("id", "metadata", "created_at", "updated_at", "last_accessed_at")
    return {"name": name, **dict.fromkeys(keys)}


def _mime_matches(content_type: str, pattern: str) -> bool:
    if pattern.endswith("/*"):
        return content_type.startswith(pattern[:-1])
    return content_type == pattern
