"""A capacity cap in front of a local function URL, answering like Cloud Run at max instances.

Facts it honours (docs/outside-services.md "Cloud Run (under Cloud Functions 2nd gen) at its
limits"; Cloud Run's "About instance autoscaling" page):
- A service has max instances x concurrency request slots. A request beyond them waits up to about
  10 s (the current docs; it was 60 s once) for a slot, then fails with 429. Cloud Run's logs say
  "The request was aborted because there was no available instance."; the caller gets Google's
  front-end error page ("Rate exceeded.").
- A request still running at the function's timeout gets 504 ("upstream request timeout") while the
  instance may keep working on it: here the upstream is left to finish and its slot stays taken until
  it does (the strict side: the capacity it really uses).
- The body is streamed both ways; only loopback upstreams are expected.

A private service (deployed --no-allow-unauthenticated) also checks the caller before anything
reaches the container, and before the request waits for an instance (Cloud Run, "Authenticating
service-to-service"; "Custom audiences"): the caller sends `Authorization: Bearer <Google ID
token>` whose `aud` is the service's URL (for a 2nd gen function its cloudfunctions.net URL, which
is the one used here) and whose principal has roles/run.invoker. No token, a malformed, expired or
wrongly signed one, another issuer or another audience answer 401; a valid token of a principal
without run.invoker answers 403 (the usual causes of each, as Cloud Run's troubleshooting page and
encore.dev's service-to-service guide list them). Google's front end answers both with its HTML
error page. A request let through reaches the container with the token's signature replaced by
SIGNATURE_REMOVED_BY_GOOGLE, so the code behind it cannot replay it. The ID tokens are the local
Cloud Tasks' (devstack/emulators/cloud_tasks.py: HS256 under a shared key where Google signs RS256).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from werkzeug.serving import BaseWSGIServer
from werkzeug.wrappers import Request, Response

from devstack.emulators.cloud_tasks import decode_oidc_token
from devstack.events import CHANGES
from devstack.serving import serve_wsgi, stop_server

NO_INSTANCE_LOG = "The request was aborted because there was no available instance."
RATE_EXCEEDED_PAGE = (
    "<html><head>\n"
    '<meta http-equiv="content-type" content="text/html;charset=utf-8">\n'
    "<title>429 Too Many Requests</title>\n"
    "</head>\n"
    "<body text=#000000 bgcolor=#ffffff>\n"
    "<h1>Error: Too Many Requests</h1>\n"
    "<h2>Rate exceeded.</h2>\n"
    "<h2></h2>\n"
    "</body></html>\n"
)
TIMEOUT_BODY = "upstream request timeout"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
UNAUTHORIZED_PAGE = (
    "<html><head>\n"
    '<meta http-equiv="content-type" content="text/html;charset=utf-8">\n'
    "<title>401 Unauthorized</title>\n"
    "</head>\n"
    "<body text=#000000 bgcolor=#ffffff>\n"
    "<h1>Error: Unauthorized</h1>\n"
    "<h2>Your client does not have permission to the requested URL <code>{path}</code>.</h2>\n"
    "<h2></h2>\n"
    "</body></html>\n"
)
FORBIDDEN_PAGE = (
    "<html><head>\n"
    '<meta http-equiv="content-type" content="text/html;charset=utf-8">\n'
    "<title>403 Forbidden</title>\n"
    "</head>\n"
    "<body text=#000000 bgcolor=#ffffff>\n"
    "<h1>Error: Forbidden</h1>\n"
    "<h2>Your client does not have permission to get URL <code>{path}</code> from this server.</h2>\n"
    "<h2></h2>\n"
    "</body></html>\n"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}


@dataclass(frozen=True)
class Invokers:
    """A private service's access: who holds run.invoker, and the key its ID tokens are checked
    with. `audience` defaults to the front's own URL."""

    members: frozenset[str]
    key: bytes
    audience: str | None = None


class CapacityCap:
    """start() serves a proxy URL for `upstream`; at most instances x concurrency requests reach it."""

    def __init__(
        self,
        upstream: str,
        *,
        instances: int,
        concurrency: int,
        queue_wait_s: float = 10.0,
        timeout_s: float = 300.0,
        invokers: Invokers | None = None,
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.invokers = invokers
        self.refused: list[int] = []  # 401s and 403s of a private service, in order
        self.slots = instances * concurrency
        self.queue_wait_s = queue_wait_s
        self.timeout_s = timeout_s
        self.rejected = 0  # 429s for want of a slot
        self.timed_out = 0  # 504s at the function timeout
        self.served = 0
        self.max_in_flight = 0
        self.log: list[str] = []  # what Cloud Run's request log would say, one line per refusal
        self._free = threading.Semaphore(self.slots)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._upstreams: set[http.client.HTTPConnection] = set()
        self._drains: set[threading.Thread] = set()
        self._server: BaseWSGIServer | None = None
        self.url = ""

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server, self.url = serve_wsgi(self, host, port, "cloud-run-cap")
        return self.url

    def stop(self) -> None:
        stop_server(self._server)
        self._server = None
        with self._lock:
            for conn in self._upstreams:
                _shut(conn)
            drains = list(self._drains)
        for drain in drains:
            drain.join()

    # -- the proxy ---------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        response = self._handle(request)
        return response(environ, start_response)

    def _handle(self, request: Request) -> Response:
        body = request.get_data()  # webhook and task bodies are small (1 MB at most)
        headers = _forwarded(request)
        if self.invokers is not None:
            status = self._check_caller(request)
            if status is not None:
                with self._lock:
                    self.refused.append(status)
                page = UNAUTHORIZED_PAGE if status == 401 else FORBIDDEN_PAGE
                return Response(
                    page.format(path=request.path), status=status, content_type="text/html; charset=UTF-8"
                )
            head, payload, _ = request.headers["Authorization"].split(" ", 1)[1].split(".")
            headers["Authorization"] = f"Bearer {head}.{payload}.SIGNATURE_REMOVED_BY_GOOGLE"
        if not self._free.acquire(timeout=self.queue_wait_s):
            with self._lock:
                self.rejected += 1
                self.log.append(NO_INSTANCE_LOG)
            return Response(RATE_EXCEEDED_PAGE, status=429, content_type="text/html; charset=UTF-8")
        self._enter()
        deadline = time.monotonic() + self.timeout_s
        conn = http.client.HTTPConnection(
            self.upstream.hostname or "", self.upstream.port, timeout=self.timeout_s
        )
        with self._lock:
            self._upstreams.add(conn)
        try:
            conn.request(request.method, _target(request), body=body or None, headers=headers)
            upstream = conn.getresponse()
        except TimeoutError:
            return self._gateway_timeout(conn)
        except (OSError, http.client.HTTPException):
            self._leave(conn)
            return Response("upstream connect error", status=503, content_type="text/plain")
        return Response(
            self._stream(conn, upstream, deadline),
            status=upstream.status,
            headers=[(k, v) for k, v in upstream.getheaders() if k.lower() not in HOP_BY_HOP],
            direct_passthrough=True,
        )

    def _stream(
        self, conn: http.client.HTTPConnection, upstream: http.client.HTTPResponse, deadline: float
    ) -> Iterator[bytes]:
        try:
            while chunk := upstream.read1(64 * 1024):
                yield chunk
                if conn.sock is not None:
                    conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
            with self._lock:
                self.served += 1
        except (OSError, http.client.HTTPException):
            return  # cut mid-body, as the platform would at its timeout
        finally:
            self._leave(conn)

    def _check_caller(self, request: Request) -> int | None:
        """401 unless a valid ID token for this service; 403 unless its principal may invoke it."""
        assert self.invokers is not None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return 401
        try:
            claims = decode_oidc_token(token.strip(), self.invokers.key)
        except ValueError:  # not base64 or not JSON: not a token at all
            return 401
        if claims is None:
            return 401
        audience = self.invokers.audience or self.url
        if (
            claims.get("iss") not in GOOGLE_ISSUERS
            or claims.get("aud") != audience
            or not isinstance(claims.get("exp"), int)
            or claims["exp"] <= time.time()
        ):
            return 401
        if claims.get("email") not in self.invokers.members or claims.get("email_verified") is not True:
            return 403
        return None

    def _gateway_timeout(self, conn: http.client.HTTPConnection) -> Response:
        """Answer 504 now; the upstream keeps its slot until it finishes on its own."""
        with self._lock:
            self.timed_out += 1
            drain = threading.Thread(target=self._drain, args=(conn,), name="cloud-run-drain", daemon=True)
            self._drains.add(drain)
        drain.start()
        return Response(TIMEOUT_BODY, status=504, content_type="text/plain")

    def _drain(self, conn: http.client.HTTPConnection) -> None:
        try:
            if conn.sock is not None:
                conn.sock.settimeout(None)
                with contextlib.suppress(OSError):
                    while conn.sock.recv(64 * 1024):
                        pass
        finally:
            self._leave(conn)
            with self._lock:
                self._drains.discard(threading.current_thread())

    @property
    def in_flight(self) -> int:
        """Requests holding a slot: one past its timeout keeps it until the function ends."""
        with self._lock:
            return self._in_flight

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        CHANGES.notify()

    def _leave(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._lock:
            if conn not in self._upstreams:
                return
            self._upstreams.discard(conn)
            self._in_flight -= 1
        self._free.release()
        CHANGES.notify()


def _target(request: Request) -> str:
    query = request.query_string.decode()
    return request.path + (f"?{query}" if query else "")


def _forwarded(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}


def _shut(conn: http.client.HTTPConnection) -> None:
    if conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
