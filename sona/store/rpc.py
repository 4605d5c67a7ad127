"""PostgREST's RPC, the only call the jobs store makes: POST /rest/v1/rpc/<name> with the
parameters as a JSON object, the function's result as JSON back, errors as PostgREST's JSON body
({"code", "message", "details", "hint"}, https://docs.postgrest.org/en/stable/references/errors.html).

Spoken over urllib3 (requests' connection pool: thread-safe, keep-alive, drops a dead pooled
connection before reuse) rather than postgrest-py on httpx: the claim is the first thing a cold
worker does, and postgrest-py with httpx, httpcore, h2 and yarl cost about 70 ms of imports there
(PERFORMANCE.md). Every call ends by the deadline in effect (sona.deadline.applies).
"""

from __future__ import annotations

import json
from contextlib import suppress
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError

from sona.deadline import SLACK_S, Deadline, in_effect
from sona.tls import tls_context


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
        self._url = f"{base_url.rstrip('/')}/rest/v1/rpc/"
        self._timeout_s = timeout_s
        self._headers = {
            **headers,
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Accept-Profile": schema,
            "Content-Profile": schema,
        }
        # Up to 16 kept connections: more than an instance's request threads (THREADS, 8).
        self._pool = urllib3.PoolManager(num_pools=2, maxsize=16, ssl_context=tls_context(), retries=False)

    def call(self, name: str, params: dict[str, Any]) -> Any:
        """The function's result (None for an empty answer); RpcError, GatewayFailure, Unreachable,
        or the deadline's DeadlineExceeded otherwise."""
        deadline = in_effect()
        step = f"rpc {name}"
        timeout = self._timeout_s if deadline is None else min(self._timeout_s, deadline.check(step))
        try:
            response = self._pool.request(
                "POST",
                self._url + name,
                body=json.dumps(params).encode(),
                headers=self._headers,
                timeout=urllib3.Timeout(connect=timeout, read=timeout),
                preload_content=False,
            )
            status, media_type = response.status, _media_type(response.headers.get("Content-Type", ""))
            body = _read(response, deadline, step)
        except HTTPError as exc:
            if deadline is not None and deadline.remaining() <= SLACK_S:
                raise deadline.exceeded(step) from None
            raise Unreachable(f"{step}: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return _result(status, media_type, body)
        raise _error(status, media_type, body)


def _read(response: urllib3.BaseHTTPResponse, deadline: Deadline | None, step: str) -> bytes:
    """The whole body; the socket is shut when the deadline passes (a read timeout bounds each
    read, not their sum), and the call then ends as the deadline's."""
    try:
        if deadline is None:
            return response.read()
        with deadline.ends(lambda: _shut_down(response), step):
            return response.read()
    except BaseException:
        response.close()  # cut off or failed mid-body: the connection is not reused
        raise
    finally:
        response.release_conn()


def _shut_down(response: urllib3.BaseHTTPResponse) -> None:
    with suppress(ValueError, RuntimeError, OSError):  # already read, released or closed: ended
        response.shutdown()


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
