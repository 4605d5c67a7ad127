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
- a caller without the service role (a signed-in user's token, or only the anon or publishable key)
  has every object request (upload, update, list, info, sign, download, delete) run as Storage runs
  it: in a transaction with the token's role and claims (`request.jwt.claims`), so PostgreSQL
  applies the project's policies on storage.objects; a write they refuse is "403" AccessDenied, a
  row they hide is "404" NoSuchKey (issue 25, Storage 1 and 2: a user signs and lists their own
  objects under a select policy). Bucket requests stay the service role's;
- `PUT /bucket/{id}` updates `public`, `file_size_limit` and `allowed_mime_types` and answers
  `{"message": "Successfully updated"}`; a bucket turned private serves no public URL
  ("404" NoSuchBucket) (issue 25, Storage 3);
- an object name ending in `/` is refused: "400" InvalidRequest "No content provided" (issue 25,
  Storage 4); `PUT /object` on a missing name creates it, as an upsert (Storage 5);
- object info in a missing bucket is NoSuchBucket; a missing object is NoSuchKey "Object not found";
  a signed URL's token is an HS256 JWT with the project's secret (`url`, `iat`, `exp`): a tampered
  one is InvalidJWT, a missing one InvalidRequest "querystring must have required property
  'token'" (Storage 6). The real token also carries a `scope` claim whose value was not recorded:
  it is left out, and nothing here reads it;
- each write stores a new `version` uuid; an upload without a cache time is stored `no-cache`;
  absent user metadata is `{}`; object info carries Cache-Control, ETag and Last-Modified headers;
  stored (and listed) metadata has `eTag`, `size`, `mimetype`, `cacheControl`, `lastModified`,
  `contentLength`, `httpStatusCode` (Storage 7).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from werkzeug.wrappers import Request, Response

from devstack.emulators.storage_uploads import ReceivedUpload, receive_upload
from devstack.emulators.user_jwt import check_jwt, sign_jwt
from devstack.serving import json_response
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


def _bad_size_limit() -> Response:
    return _storage_error(
        "400", "InvalidRequest", "body/file_size_limit must match a schema in anyOf", "Bad Request"
    )


def _invalid_bucket_name() -> Response:
    return _storage_error("400", "InvalidBucketName", "Bucket name invalid", "Invalid Input")


def access_denied(message: str) -> Response:
    """Storage's AccessDenied (a JWT it cannot verify, or row level security): HTTP 400, "403"."""
    return json_response(
        {"statusCode": "403", "code": "AccessDenied", "error": "Unauthorized", "message": message}, 400
    )


# Bucket requests without the service role: storage.buckets has row level security on and this
# project adds no policies on it, so a create is refused and a read or an update finds nothing.
_BUCKET_ROUTES = {"storage:bucket_create", "storage:bucket_get", "storage:bucket_update"}


def _bucket_refused(route: str) -> Response:
    if route == "storage:bucket_create":
        return access_denied("new row violates row-level security policy")
    return _no_such_bucket()


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
            methods = {"POST": "storage:bucket_create", "PUT": "storage:bucket_update"}
            return methods.get(request.method, "storage:bucket_get")
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
        """`claims`: a verified user token's. Whoever is not the service role meets the policies on
        storage.objects with their role and claims, as the real server's database connection does."""
        user = None if role == "service_role" else (claims or {"role": role})
        if user is not None and route in _BUCKET_ROUTES:
            return _bucket_refused(route)
        parts = request.path.removeprefix("/storage/v1/").split("/")
        if route == "storage:delete":
            return self._delete(parts[1], "/".join(parts[2:]), request, user)
        if route == "storage:bucket_get":
            return self._bucket_get(parts[1] if len(parts) > 1 else "")
        if route == "storage:bucket_create":
            return self._bucket_create(request)
        if route == "storage:bucket_update":
            return self._bucket_update(parts[1] if len(parts) > 1 else "", request)
        if route in ("storage:upload", "storage:update"):
            return self._upload(parts[1], "/".join(parts[2:]), request, route == "storage:update", user)
        if route == "storage:public":
            return self._serve(parts[2], "/".join(parts[3:]), request, require_public=True)
        if route == "storage:sign":
            return self._sign(parts[2], "/".join(parts[3:]), request, user)
        if route == "storage:signed_get":
            return self._serve_signed(parts[2], "/".join(parts[3:]), request)
        if route == "storage:list":
            return self._list(parts[2], request, user)
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
            return _bad_size_limit()
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

    def _bucket_update(self, bucket_id: str, request: Request) -> Response:
        """PUT /bucket/{id}: the fields given change, the others stay (bucket.ts updateBucket)."""
        body = request.get_json(force=True, silent=True) or {}
        changes: dict[str, Any] = {}
        if "public" in body:
            changes["public"] = bool(body["public"])
        if "file_size_limit" in body:
            try:
                changes["file_size_limit"] = _size_limit(body["file_size_limit"])
            except ValueError:
                return _bad_size_limit()
            if (changes["file_size_limit"] or 0) > self.upload_limit:
                return _too_large()
        if "allowed_mime_types" in body:
            changes["allowed_mime_types"] = body["allowed_mime_types"]
        assignments = "".join(f", {column} = %({column})s" for column in changes)
        with self._pool.connection() as conn:
            row = conn.execute(
                f"update storage.buckets set updated_at = now(){assignments}"  # type: ignore[arg-type]
                " where id = %(id)s returning id",
                {**changes, "id": bucket_id},
            ).fetchone()
            conn.commit()
        if row is None:
            return _no_such_bucket()
        return json_response({"message": "Successfully updated"})

    def _object_path(self, bucket_id: str, name: str) -> Path:
        path = (self.storage_dir / bucket_id / name).resolve()
        if not path.is_relative_to(self.storage_dir.resolve()) or not name:
            raise ValueError(name)
        return path

    def _upload(
        self, bucket_id: str, name: str, request: Request, update: bool, user: dict[str, Any] | None = None
    ) -> Response:
        """POST uploads (x-upsert: true overwrites); PUT updates, which is an upsert: a missing name
        is created (issue 25, Storage 5). Each write stores a new version."""
        if not is_valid_bucket_name(bucket_id):
            return _invalid_bucket_name()
        bucket = self._bucket(bucket_id)
        if bucket is None:
            return _no_such_bucket()
        if name.endswith("/"):
            # A folder name holds no content: the real server refuses it (issue 25, Storage 4).
            return _storage_error("400", "InvalidRequest", "No content provided")
        try:
            received = receive_upload(request, self.storage_dir)
        except ValueError:
            return _storage_error("400", "InvalidRequest", "metadata must be JSON")
        with received:
            return self._store(bucket, name, received, update or _upsert(request), user)

    def _store(
        self,
        bucket: dict[str, Any],
        name: str,
        received: ReceivedUpload,
        upsert: bool,
        user: dict[str, Any] | None,
    ) -> Response:
        """The checks Storage makes of a received upload, then its row and its bytes."""
        limit = bucket["file_size_limit"]
        # uploader.ts getStandardMaxFileSizeLimit: the smaller of the bucket's and the project's.
        if received.size > min(self.upload_limit, limit if limit is not None else self.upload_limit):
            return _too_large()
        allowed = bucket["allowed_mime_types"]
        content_type = received.content_type
        if allowed and not any(_mime_matches(content_type, m) for m in allowed):
            return _storage_error(
                "415", "InvalidMimeType", f"mime type {content_type} is not supported", "invalid_mime_type"
            )
        bucket_id = bucket["id"]
        try:
            if not is_valid_key(name):
                raise ValueError(name)
            target = self._object_path(bucket_id, name)
        except ValueError:
            return _storage_error("400", "InvalidKey", f"Invalid key: {name}")
        params = {
            "b": bucket_id,
            "n": name,
            "m": json.dumps(_object_metadata(received, content_type)),
            "u": json.dumps(received.metadata) if received.metadata is not None else None,
            "v": str(uuid.uuid4()),
        }
        statement = (
            "insert into storage.objects (bucket_id, name, metadata, user_metadata, version)"
            " values (%(b)s, %(n)s, %(m)s, %(u)s, %(v)s) on conflict (bucket_id, name) do "
            + (
                "update set metadata = excluded.metadata, user_metadata = excluded.user_metadata,"
                " version = excluded.version, updated_at = now()"
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
                return _duplicate("KeyAlreadyExists")
            target.parent.mkdir(parents=True, exist_ok=True)
            received.keep(target)
            conn.commit()
        return json_response({"Key": f"{bucket_id}/{name}", "Id": str(row[0])})

    def _list(self, bucket_id: str, request: Request, user: dict[str, Any] | None = None) -> Response:
        """POST /object/list/{bucket}, as storage.search (migration 0063) answers it sorted by name:
        the names under `prefix` that start with `search`, compared lower-cased (no wildcards),
        files and folders (id null) in lower-cased name order. A missing bucket lists nothing; a
        caller who is not the service role lists what the select policies let them see."""
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
            user,
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
                    "created_at": _iso(created),
                    "updated_at": _iso(updated),
                    "last_accessed_at": _iso(updated),
                }
            )
        offset = int(body.get("offset") or 0)
        limit = min(int(body.get("limit") or 100), 1500)
        return json_response(items[offset : offset + limit])

    def _info(self, bucket_id: str, name: str, user: dict[str, Any] | None = None) -> Response:
        """GET /object/info: the object's fields, and the download's cache headers beside them."""
        if self._bucket(bucket_id) is None:
            return _no_such_bucket()
        row = self._read_one(
            "select id, metadata, user_metadata, created_at, updated_at, version from storage.objects"
            " where bucket_id = %s and name = %s",
            (bucket_id, name),
            user,
        )
        if row is None:
            return _no_such_key()
        oid, meta, user_meta, created, updated, version = row
        meta = meta or {}
        response = json_response(
            {
                "id": str(oid),
                "name": name,
                "version": version,
                "bucket_id": bucket_id,
                "size": meta.get("size"),
                "content_type": meta.get("mimetype"),
                "cache_control": meta.get("cacheControl"),
                "etag": meta.get("eTag"),
                "metadata": user_meta or {},
                "last_modified": _iso(updated),
                "created_at": _iso(created),
            }
        )
        response.headers["Cache-Control"] = meta.get("cacheControl", "no-cache")
        response.headers["ETag"] = meta.get("eTag", "")
        response.last_modified = updated
        return response

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
            return _no_such_key()
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

    def _sign(self, bucket_id: str, name: str, request: Request, user: dict[str, Any] | None) -> Response:
        """POST /object/sign: the object must be one the caller can select (object.ts
        signObjectUrl finds it first, under the caller's policies); the token is a JWT."""
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
        now = int(time.time())
        token = sign_jwt(self.jwt_secret, {"url": f"{bucket_id}/{name}", "iat": now, "exp": now + expires_in})
        # object.ts signObjectUrl: the path comes back decoded (decodeURI), not percent-encoded.
        return json_response({"signedURL": f"/object/sign/{bucket_id}/{name}?token={token}"})

    def _serve_signed(self, bucket_id: str, name: str, request: Request) -> Response:
        token = request.args.get("token")
        if token is None:
            return _storage_error(
                "400", "InvalidRequest", "querystring must have required property 'token'", "Bad Request"
            )
        claims, problem = check_jwt(token, self.jwt_secret)
        if problem == "expired":
            return _storage_error("400", "ExpiredToken", "The provided token has expired.")
        if claims is None:
            return _storage_error("400", "InvalidJWT", "invalid signature")
        if claims.get("url") != f"{bucket_id}/{name}":
            return _storage_error("400", "InvalidSignature", "Invalid signature")
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


def _upsert(request: Request) -> bool:
    return request.headers.get("x-upsert", "false").lower() == "true"


def _object_metadata(received: ReceivedUpload, content_type: str) -> dict[str, Any]:
    """The metadata the real server stores (and lists) for an object."""
    return {
        "eTag": received.etag,
        "size": received.size,
        "mimetype": content_type,
        "cacheControl": received.cache_control,
        "lastModified": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "contentLength": received.size,
        "httpStatusCode": 200,
    }


def _iso(moment: datetime) -> str:
    return moment.isoformat()


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
