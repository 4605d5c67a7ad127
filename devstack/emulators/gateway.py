"""The local Supabase gateway: PostgREST's tables and RPC, the Storage endpoints, GoTrue's user and
password grant, and /functions/v1/* forwarded to a developer's own Edge Functions server.

Backed by a real PostgreSQL (tables, RPC, users, bucket and object metadata) and a folder (object
bytes). It answers with the real services' status codes and error bodies, so supabase-js and
supabase-py cannot tell the difference for the calls the function and the plug-in make. Tests can
inject faults per route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from psycopg_pool import ConnectionPool
from werkzeug.serving import BaseWSGIServer
from werkzeug.wrappers import Request, Response

from devstack.emulators.auth_api import AuthApi
from devstack.emulators.postgrest_rpc import PostgrestRpc
from devstack.emulators.postgrest_tables import PostgrestTables
from devstack.emulators.postgrest_wire import PostgrestError
from devstack.emulators.storage_api import StorageApi, access_denied
from devstack.emulators.user_jwt import check_jwt
from devstack.serving import json_response, serve_wsgi, stop_server
from sona.store.supabase_keys import PUBLISHABLE_PREFIX, SECRET_PREFIX

_BEARER = re.compile(r"^Bearer\s+", re.IGNORECASE)
# PostgREST's answer to a Bearer token that is not a JWT (e.g. an sb_secret_ key): supabase-py#1230.
NOT_A_JWT = PostgrestError(401, "PGRST301", "Expected 3 parts in JWT; got 1")
# Hop-by-hop headers a proxy does not pass on (RFC 9110), and what the HTTP client recomputes.
_NOT_FORWARDED = {"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _sign(secret: str, claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def make_jwt(secret: str, role: str, ttl_s: int = 10 * 365 * 24 * 3600) -> str:
    """An HS256 JWT shaped like Supabase's API keys (the gateway compares them verbatim)."""
    now = int(time.time())
    return _sign(secret, {"iss": "sona-local", "role": role, "iat": now, "exp": now + ttl_s})


# PostgREST's answers to a Bearer JWT it cannot accept (v12 codes).
BAD_SIGNATURE = PostgrestError(401, "PGRST301", "JWSError JWSInvalidSignature")
JWT_EXPIRED = PostgrestError(401, "PGRST303", "JWT expired")


# The API gateway's (Kong's) own error answers when PostgREST or Storage behind it fails: the message
# per status from Kong's error handler, no PostgREST code, the format chosen by the request's Accept.
GATEWAY_MESSAGES = {
    500: "An unexpected error occurred",
    502: "An invalid response was received from the upstream server",
    503: "The upstream server is currently unavailable",
    504: "The upstream server is timing out",
}


def gateway_error(status: int = 502) -> dict[str, Any]:
    """FaultPlan.add arguments for the gateway's own JSON error (Kong adds a request id)."""
    return {
        "status": status,
        "body": {"message": GATEWAY_MESSAGES[status], "request_id": uuid.uuid4().hex},
    }


def gateway_error_page(status: int = 502) -> dict[str, Any]:
    """FaultPlan.add arguments for an HTML error page (Kong's for text/html, or a CDN's)."""
    page = (
        "<html><head><title>Kong Error</title></head><body><h1>Kong Error</h1>"
        f"<p>{GATEWAY_MESSAGES[status]}.</p></body></html>"
    )
    return {"status": status, "body": page, "content_type": "text/html; charset=utf-8"}


@dataclass
class Fault:
    """A canned answer. status 0 is an empty 502 (a dead upstream); `after` does the real work
    first and then answers this instead (the request landed but its answer was lost or wrong);
    `delay_only` waits delay_s and then serves the request normally (a slow upstream). A JSON
    body is any value; with another content type the body is sent as the text it is."""

    status: int
    body: Any
    delay_s: float = 0.0
    after: bool = False
    delay_only: bool = False
    content_type: str = "application/json"

    def response(self) -> Response:
        if self.status == 0:
            return Response("", status=502)
        if self.content_type == "application/json":
            return json_response(self.body, self.status)
        return Response(self.body, status=self.status, content_type=self.content_type)


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
        content_type: str = "application/json",
    ) -> None:
        with self.lock:
            for _ in range(times):
                self.queued[route].append(Fault(status, body, delay_s, after, delay_only, content_type))

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
        secret_key: str | None = None,
        publishable_key: str | None = None,
        schema: str = "public",
        functions_url: str | None = None,
        local_password: str | None = None,
    ) -> None:
        self.database_url = database_url
        self.storage_dir = storage_dir
        # The legacy JWT keys, and the new keys a project issues beside them.
        self.service_role_key = service_role_key
        self.anon_key = anon_key
        self.secret_key = secret_key or SECRET_PREFIX + secrets.token_urlsafe(24)
        self.publishable_key = publishable_key or PUBLISHABLE_PREFIX + secrets.token_urlsafe(24)
        self.jwt_secret = jwt_secret
        self.schema = schema
        self.faults = FaultPlan()
        self.counts: dict[str, int] = defaultdict(int)
        # The headers of the latest requests, so tests can see what the real clients send.
        self.seen_headers: deque[tuple[str, dict[str, str]]] = deque(maxlen=200)
        self._counts_lock = threading.Lock()
        self._pool = ConnectionPool(
            database_url, min_size=1, max_size=20, open=False, kwargs={"autocommit": False}
        )
        self.rpc = PostgrestRpc(self._pool, schema)
        self.tables = PostgrestTables(self._pool, schema)
        # The one password every local user signs in with (auth_api.py says why).
        self.local_password = local_password or secrets.token_urlsafe(12)
        self.auth = AuthApi(self._pool, jwt_secret, self.local_password)
        # The developer's own Edge Functions server, which /functions/v1/* is forwarded to.
        self.functions_url = functions_url.rstrip("/") if functions_url else None
        self.storage = StorageApi(self._pool, storage_dir, jwt_secret)
        self._server: BaseWSGIServer | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._pool.open(wait=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._server, self.url = serve_wsgi(self, host, port, "gateway")
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
            route = StorageApi.route(request)
        elif re.fullmatch(r"/rest/v1/\w+", path):
            route = f"table:{path.removeprefix('/rest/v1/')}"
        elif path in ("/auth/v1/user", "/auth/v1/token"):
            route = f"auth:{path.removeprefix('/auth/v1/')}"
        elif path.startswith("/functions/v1/"):
            route = f"functions:{path.removeprefix('/functions/v1/')}"
        else:
            return json_response({"message": "no Route matched with those values"}, 404)
        self._count(route)
        self.seen_headers.append((route, {k.lower(): v for k, v in request.headers.items()}))
        fault = self.faults.take(route)
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.after:
                self._serve_route(route, request)
            if not fault.delay_only:
                return fault.response()
        return self._serve_route(route, request)

    def _serve_route(self, route: str, request: Request) -> Response:
        if route in ("storage:public", "storage:signed_get"):  # public reads need no key
            return self.storage.handle(route, request, "anon")
        if route.startswith("functions:"):  # the Edge Functions runtime checks its own callers
            return self._forward_function(route.removeprefix("functions:"), request)
        key = request.headers.get("apikey", "")
        role = self._key_role(key)
        if role is None:
            return json_response(
                {
                    "message": "Invalid API key" if key else "No API key found in request",
                    "hint": "Double check your Supabase `anon` or `service_role` API key.",
                },
                401,
            )
        if route.startswith("auth:"):  # GoTrue reads the user's token itself
            return self.auth.handle(route, request)
        bearer = request.headers.get("Authorization")
        claims: dict[str, Any] | None = None
        if bearer is not None:
            token = _BEARER.sub("", bearer, count=1)
            if len(token.split(".")) != 3:
                # Supabase's gateway resolves a new key sent as Bearer when it is the request's own
                # apikey (supabase-js does so when nobody is signed in): the key's role, as if no
                # Bearer were sent. Anything else with no three parts reaches PostgREST and Storage
                # as it is, and they take only a JWT there.
                if token.startswith((SECRET_PREFIX, PUBLISHABLE_PREFIX)) and hmac.compare_digest(
                    token.encode(), key.encode()
                ):
                    return self._serve_as(route, request, role, None)
                if route.startswith(("rpc:", "table:")):
                    return NOT_A_JWT.response()
                return access_denied("Invalid Compact JWS")
            known = self._jwt_role(token)
            if known is None:
                # Any other JWT must be signed with the project's secret (a user's access token):
                # its role claim decides, and PostgREST and Storage get all its claims (auth.uid()
                # reads `sub`).
                claims, problem = check_jwt(token, self.jwt_secret)
                if claims is None or not isinstance(claims.get("role"), str):
                    if route.startswith(("rpc:", "table:")):
                        return (JWT_EXPIRED if problem == "expired" else BAD_SIGNATURE).response()
                    return access_denied("jwt expired" if problem == "expired" else "invalid signature")
                role = claims["role"]
            else:
                role = known
        return self._serve_as(route, request, role, claims)

    def _serve_as(self, route: str, request: Request, role: str, claims: dict[str, Any] | None) -> Response:
        if route.startswith("rpc:"):
            return self.rpc.handle(route.removeprefix("rpc:"), request, role, claims)
        if route.startswith("table:"):
            return self.tables.handle(route.removeprefix("table:"), request, role, claims or {"role": role})
        return self.storage.handle(route, request, role, claims)

    def _forward_function(self, name: str, request: Request) -> Response:
        """/functions/v1/<name> to the developer's Edge Functions server (`dev --functions-url`),
        method, path, query, headers and body as they came; its answer as it is."""
        if self.functions_url is None:
            return json_response(
                {
                    "code": "NOT_FOUND",
                    "message": "Requested function was not found",
                    "hint": "the local stack serves no Edge Functions: start dev with --functions-url",
                },
                404,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        url = f"{self.functions_url}/{name}"
        try:
            answer = httpx.request(
                request.method,
                url,
                params=list(request.args.items(multi=True)),
                headers=headers,
                content=request.get_data(),
                timeout=150,  # the platform's idle timeout for functions
            )
        except httpx.HTTPError:
            return json_response({"message": GATEWAY_MESSAGES[502], "request_id": uuid.uuid4().hex}, 502)
        passed = [
            (k, v)
            for k, v in answer.headers.items()
            if k.lower() not in _NOT_FORWARDED | {"content-encoding"}
        ]
        return Response(answer.content, status=answer.status_code, headers=passed)

    def _key_role(self, key: str) -> str | None:
        """The role the gateway maps an `apikey` to: the legacy JWTs and the new keys alike."""
        roles = (
            (self.service_role_key, "service_role"),
            (self.secret_key, "service_role"),
            (self.anon_key, "anon"),
            (self.publishable_key, "anon"),
        )
        for known, role in roles:
            if key and hmac.compare_digest(key.encode(), known.encode()):
                return role
        return None

    def _jwt_role(self, token: str) -> str | None:
        """A legacy key sent as Bearer speaks for its own role (keys are compared, not verified)."""
        for known, role in ((self.service_role_key, "service_role"), (self.anon_key, "anon")):
            if hmac.compare_digest(token.encode(), known.encode()):
                return role
        return None
