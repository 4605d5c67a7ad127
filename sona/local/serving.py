"""Running a loopback HTTP server in a background thread, and stopping it promptly."""

from __future__ import annotations

import json
import socketserver
import threading
from typing import Any

from werkzeug.wrappers import Response


def serve_in_thread(server: socketserver.BaseServer, name: str) -> None:
    if isinstance(server, socketserver.ThreadingMixIn):
        server.daemon_threads = True
    # A short poll interval lets shutdown() return in 50 ms instead of 500.
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=name
    ).start()


def stop_server(server: socketserver.BaseServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json; charset=utf-8")
