"""Running a loopback HTTP server in a background thread, and stopping it promptly."""

from __future__ import annotations

import json
import socketserver
import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Response


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return


def serve_wsgi(app: Any, host: str, port: int, name: str) -> tuple[BaseWSGIServer, str]:
    """A threaded WSGI server for a local stand-in, quiet, in a background thread; and its URL."""
    server = make_server(host, port, app, threaded=True, request_handler=_QuietHandler)
    serve_in_thread(server, name)
    return server, f"http://{host}:{server.server_port}"


# Each server's serving thread, so stopping it can wait for the thread to end too.
_threads: dict[int, threading.Thread] = {}


def serve_in_thread(server: socketserver.BaseServer, name: str) -> None:
    if isinstance(server, socketserver.ThreadingMixIn):
        server.daemon_threads = True
    # A short poll interval lets shutdown() return in 50 ms instead of 500.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=name
    )
    _threads[id(server)] = thread
    thread.start()


def stop_server(server: socketserver.BaseServer | None) -> None:
    """shutdown() returns once serve_forever has left its loop; the thread itself ends a moment
    later, so it is joined: a stopped stand-in leaves no thread behind."""
    if server is not None:
        server.shutdown()
        server.server_close()
        thread = _threads.pop(id(server), None)
        if thread is not None:
            thread.join(timeout=5)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json; charset=utf-8")
