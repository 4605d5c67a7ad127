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
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool
from werkzeug.serving import BaseWSGIServer
from werkzeug.wrappers import Request, Response

from devstack.emulators.postgrest_rpc import PostgrestRpc
from devstack.emulators.storage_api import StorageApi, access_denied
from devstack.emulators.user_jwt import check_jwt
from devstack.serving import json_response, serve_wsgi, stop_server
from sona.store.supabase_keys import PUBLISHABLE_PREFIX, SECRET_PREFIX

_BEARER = re.compile(r"^Bearer\s+", re.IGNORECASE)
# PostgREST's answer to a Bearer token that is not a JWT (e.g. an sb_secret_ key): supabase-py#1230.
NOT_A_JWT = {"code": "PGRST301", "details": None, "hint": None, "message": "Expected 3 parts in JWT; got 1"}


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
BAD_SIGNATURE = {"code": "PGRST301", "details": None, "hint": None, "message": "JWSError JWSInvalidSignature"}
JWT_EXPIRED = {"code": "PGRST303", "details": None, "hint": None, "message": "JWT expired"}


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
        bearer = request.headers.get("Authorization")
        claims: dict[str, Any] | None = None
        if bearer is not None:
            # What reaches PostgREST and Storage is the caller's own Authorization: they take only
            # a JWT there, so a new key (or anything else with no three parts) is refused.
            token = _BEARER.sub("", bearer, count=1)
            if len(token.split(".")) != 3:
                if route.startswith(("rpc:", "table:")):
                    return json_response(NOT_A_JWT, 401)
                return access_denied("Invalid Compact JWS")
            known = self._jwt_role(token)
            if known is None:
                # Any other JWT must be signed with the project's secret (a user's access token):
                # its role claim decides, and PostgREST and Storage get all its claims (auth.uid()
                # reads `sub`).
                claims, problem = check_jwt(token, self.jwt_secret)
                if claims is None or not isinstance(claims.get("role"), str):
                    if route.startswith(("rpc:", "table:")):
                        return json_response(JWT_EXPIRED if problem == "expired" else BAD_SIGNATURE, 401)
                    return access_denied("jwt expired" if problem == "expired" else "invalid signature")
                role = claims["role"]
            else:
                role = known
        if route.startswith("rpc:"):
            return self.rpc.handle(route.removeprefix("rpc:"), request, role, claims)
        if route.startswith("table:"):
            if request.method != "POST":
                return json_response({"message": "only inserts are served locally"}, 405)
            return self.rpc.insert(route.removeprefix("table:"), request, role, claims or {"role": role})
        return self.storage.handle(route, request, role, claims)

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
