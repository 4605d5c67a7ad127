"""PostgREST's RPC, the only call the jobs store makes: POST /rest/v1/rpc/<name> with the
parameters as a JSON object, the function's result as JSON back, errors as PostgREST's JSON body
({"code", "message", "details", "hint"}, https://docs.postgrest.org/en/stable/references/errors.html).

Spoken over the standard library's http.client, which a function has loaded before its first
request (gunicorn and werkzeug use it), with a few kept-alive connections: the claim is the first
thing a cold worker does, and the clients it could use cost imports before that answer:
postgrest-py with httpx, httpcore, h2 and yarl about 70 ms, urllib3 about 20 ms (PERFORMANCE.md).
Every call ends by the deadline in effect (sona.deadline.applies).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from sona.deadline import SLACK_S, Deadline, in_effect
from sona.tls import tls_context

# Connections kept open between calls: more than an instance's request threads (THREADS, 8).
KEPT = 16


class RpcError(Exception):
    """An error PostgREST wrote: its code is a SQLSTATE or one of its own PGRST codes (None when
    a plain-text or code-less answer below 500 came back, such as the gateway's "Invalid API key")."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class GatewayFailure(Exception):
    """An error answer PostgREST did not write (the API gateway's own 5xx, an HTML error page):
    the request may or may not have reached the database, so it says nothing about the job."""

    def __init__(self, status: int, media_type: str) -> None:
        super().__init__(f"HTTP {status} {media_type or 'without a content type'}")


class Unreachable(Exception):
    """No answer at all: refused, reset, timed out, or cut off mid-body."""


class RpcClient:
    def __init__(self, base_url: str, schema: str, headers: dict[str, str], timeout_s: float) -> None:
        url = urlsplit(base_url)
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname or "", url.port
        self._path = f"{url.path.rstrip('/')}/rest/v1/rpc/"
        # Built with the client whatever the scheme: production's URL is https, so its first call
        # pays for it anyway, and the local stack's plain-HTTP cold start keeps that cost in.
        self._tls = tls_context()
        self._timeout_s = timeout_s
        self._headers = {
            **headers,
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Accept-Profile": schema,
            "Content-Profile": schema,
        }
        self._kept: list[http.client.HTTPConnection] = []  # idle, the most recently used last
        self._lock = threading.Lock()

    def call(self, name: str, params: dict[str, Any]) -> Any:
        """The function's result (None for an empty answer); RpcError, GatewayFailure, Unreachable,
        or the deadline's DeadlineExceeded otherwise."""
        deadline = in_effect()
        step = f"rpc {name}"
        timeout = self._timeout_s if deadline is None else min(self._timeout_s, deadline.check(step))
        conn = self._connection(timeout)
        try:
            conn.request("POST", self._path + name, body=json.dumps(params).encode(), headers=self._headers)
            sock = conn.sock  # the response reads on from it even when the connection lets it go
            response = conn.getresponse()
            status, media_type = response.status, _media_type(response.getheader("Content-Type", ""))
            body = _read(response, sock, deadline, step)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()  # refused, reset, timed out or cut off mid-body: never reused
            if deadline is not None and deadline.remaining() <= SLACK_S:
                raise deadline.exceeded(step) from None
            raise Unreachable(f"{step}: {type(exc).__name__}") from None
        except BaseException:
            conn.close()  # cut at the deadline (DeadlineExceeded), or interrupted
            raise
        self._keep(conn, response)
        if 200 <= status < 300:
            return _result(status, media_type, body)
        raise _error(status, media_type, body)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        """A kept connection the server has not closed meanwhile (an idle socket that reads as ready
        has been closed or sent something unasked: it is dropped), else a new one."""
        while True:
            with self._lock:
                conn = self._kept.pop() if self._kept else None
            if conn is None:
                if self._https:
                    return http.client.HTTPSConnection(
                        self._host, self._port, timeout=timeout, context=self._tls
                    )
                return http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            if conn.sock is not None and not _readable(conn.sock):
                conn.sock.settimeout(timeout)
                return conn
            conn.close()

    def _keep(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        with self._lock:
            if not response.will_close and len(self._kept) < KEPT:
                self._kept.append(conn)
                return
        conn.close()


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _read(
    response: http.client.HTTPResponse, sock: socket.socket | None, deadline: Deadline | None, step: str
) -> bytes:
    """The whole body; the socket is shut when the deadline passes (a read timeout bounds each
    read, not their sum), and the call then ends as the deadline's."""
    if deadline is None:
        return response.read()
    with deadline.cuts(sock, step):
        return response.read()


def _result(status: int, media_type: str, body: bytes) -> Any:
    """PostgREST answers a function's result as JSON; anything else came from in front of it."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise GatewayFailure(status, media_type) from None


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _error(status: int, media_type: str, body: bytes) -> Exception:
    """Tell PostgREST's answer from the gateway's by what it is: PostgREST always sends JSON with a
    code; a 5xx without one, or an HTML page, came from in front of it."""
    parsed: Any = None
    if media_type != "text/html":
        try:
            parsed = json.loads(body)
        except ValueError:  # plain text, or not UTF-8
            parsed = None
    fields = parsed if isinstance(parsed, dict) else {}
    code = fields.get("code")
    code = str(code) if code is not None else None
    if media_type == "text/html" or (status >= 500 and code is None):
        return GatewayFailure(status, media_type)
    message = fields.get("message")
    if message is None:
        message = body[:200].decode(errors="replace")
    return RpcError(status, code, str(message))
