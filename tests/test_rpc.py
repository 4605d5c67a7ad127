"""PostgREST's RPC over http.client (sona/store/rpc.py), against a loopback server that answers as told."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, cast

import pytest

from devstack.serving import serve_wsgi, stop_server
from sona.deadline import Deadline
from sona.errors import DeadlineExceeded
from sona.store.rpc import GatewayFailure, RpcClient, RpcError, Unreachable


class Answers:
    """A WSGI app: every request gets the next answer (status, content type, body chunks, pause
    between chunks); it records what it was sent."""

    def __init__(self) -> None:
        self.next: tuple[int, str, list[bytes], float] = (200, "application/json", [b"[]"], 0.0)
        self.seen: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        self.seen.append(
            {
                "path": environ["PATH_INFO"],
                "profile": environ.get("HTTP_CONTENT_PROFILE"),
                "apikey": environ.get("HTTP_APIKEY"),
                "body": json.loads(environ["wsgi.input"].read(length)),
            }
        )
        status, content_type, chunks, pause = self.next
        start_response(f"{status} X", [("Content-Type", content_type)])
        return self._trickle(chunks, pause)

    @staticmethod
    def _trickle(chunks: list[bytes], pause: float) -> Iterator[bytes]:
        for chunk in chunks:
            time.sleep(pause)  # a slow body is what these tests are about: the pause is the behaviour
            yield chunk


@pytest.fixture
def answers() -> Iterator[tuple[Answers, RpcClient]]:
    app = Answers()
    server, url = serve_wsgi(app, "127.0.0.1", 0, "rpc-test")
    try:
        yield app, RpcClient(url, "public", {"apikey": "k"}, timeout_s=5)
    finally:
        stop_server(server)


def test_a_call_posts_its_parameters_to_the_functions_route_and_returns_its_result(
    answers: tuple[Answers, RpcClient],
) -> None:
    app, client = answers
    app.next = (200, "application/json; charset=utf-8", [b'[{"id": 1}]'], 0.0)
    assert client.call("claim_job", {"p_job_id": "j"}) == [{"id": 1}]
    assert app.seen == [
        {"path": "/rest/v1/rpc/claim_job", "profile": "public", "apikey": "k", "body": {"p_job_id": "j"}}
    ]


def test_an_empty_answer_is_none(answers: tuple[Answers, RpcClient]) -> None:
    app, client = answers
    app.next = (204, "application/json", [], 0.0)
    assert client.call("f", {}) is None


POSTGREST_ERROR = json.dumps({"code": "P0001", "message": "bad row", "details": None, "hint": None}).encode()
TIMEOUT = b'{"code": "57014", "message": "timeout"}'
JSON = "application/json"

# (what came back: status, content type, body) -> the kind of error, and its code where PostgREST wrote one
ERRORS: list[tuple[str, int, str, bytes, type[Exception], str | None]] = [
    ("PostgREST's error", 400, JSON, POSTGREST_ERROR, RpcError, "P0001"),
    ("PostgREST's 5xx", 500, JSON, TIMEOUT, RpcError, "57014"),
    ("a code-less refusal below 500", 401, JSON, b'{"message": "Invalid API key"}', RpcError, None),
    ("plain text below 500", 404, "text/plain", b"Not Found", RpcError, None),
    ("the gateway's code-less 5xx", 502, JSON, b'{"message": "bad gateway"}', GatewayFailure, None),
    ("an HTML page", 404, "text/html", b"<html>nope</html>", GatewayFailure, None),
    ("an empty 503", 503, "", b"", GatewayFailure, None),
    ("a 200 that is not JSON", 200, "text/plain", b"OK", GatewayFailure, None),
]


@pytest.mark.parametrize(
    ("status", "content_type", "body", "kind", "code"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_an_error_answer_says_who_wrote_it(
    answers: tuple[Answers, RpcClient],
    status: int,
    content_type: str,
    body: bytes,
    kind: type[Exception],
    code: str | None,
) -> None:
    app, client = answers
    app.next = (status, content_type, [body], 0.0)
    with pytest.raises(kind) as caught:
        client.call("f", {})
    assert getattr(caught.value, "code", None) == code


def test_nothing_listening_is_unreachable() -> None:
    with pytest.raises(Unreachable):
        RpcClient("http://127.0.0.1:9", "public", {}, timeout_s=2).call("f", {})


def test_an_answer_still_trickling_in_at_the_deadline_is_cut_off_there(
    answers: tuple[Answers, RpcClient],
) -> None:
    app, client = answers
    # Each piece arrives well within the read timeout; only their sum outlives the deadline.
    app.next = (200, "application/json", [b"[", *[b" " for _ in range(30)], b"]"], 0.1)
    started = time.monotonic()
    with Deadline(1.0).applies(), pytest.raises(DeadlineExceeded):
        client.call("f", {})
    assert time.monotonic() - started < 1.5


def test_no_call_starts_when_the_deadline_is_spent(answers: tuple[Answers, RpcClient]) -> None:
    app, client = answers
    with Deadline(0.0).applies(), pytest.raises(DeadlineExceeded):
        client.call("f", {})
    assert app.seen == []


class KeepAlive(BaseHTTPRequestHandler):
    """HTTP/1.1 with kept-alive connections, as PostgREST behind its gateway speaks: answers [] and
    records which connection (client port) each call came on. With `hang_up` set it closes each
    connection right after answering, without saying so (as a server does at its idle timeout)."""

    protocol_version = "HTTP/1.1"
    ports: ClassVar[list[int]] = []
    hang_up: ClassVar[bool] = False
    closed: ClassVar[threading.Event] = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).ports.append(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")
        self.close_connection = type(self).hang_up

    def log_message(self, format: str, *args: Any) -> None:
        pass


class KeepAliveServer(ThreadingHTTPServer):
    """Tells its handler's `closed` once a connection's socket is really closed: the handler's own
    finish() comes before that, and a client told then could still find the socket open."""

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        cast(type[KeepAlive], self.RequestHandlerClass).closed.set()


@pytest.fixture
def keep_alive() -> Iterator[tuple[type[KeepAlive], RpcClient]]:
    handler = type("Handler", (KeepAlive,), {"ports": [], "hang_up": False, "closed": threading.Event()})
    server = KeepAliveServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, RpcClient(f"http://127.0.0.1:{server.server_port}", "public", {}, timeout_s=5)
    finally:
        server.shutdown()
        server.server_close()


def test_calls_reuse_the_connection_the_previous_call_left_open(
    keep_alive: tuple[type[KeepAlive], RpcClient],
) -> None:
    server, client = keep_alive
    for _ in range(3):
        assert client.call("f", {}) == []
    assert len(server.ports) == 3
    assert len(set(server.ports)) == 1


def test_a_kept_connection_the_server_closed_meanwhile_is_replaced_not_failed(
    keep_alive: tuple[type[KeepAlive], RpcClient],
) -> None:
    server, client = keep_alive
    server.hang_up = True
    assert client.call("f", {}) == []
    assert server.closed.wait(5)  # the server has hung up on the connection the client kept
    assert client.call("f", {}) == []
    assert len(set(server.ports)) == 2
