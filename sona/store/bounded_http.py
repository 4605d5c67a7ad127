"""An httpx transport that ends every request by the deadline in effect (sona.deadline.applies).

storage3 builds its requests itself and takes no per-call timeout; this transport,
under its httpx client, caps each request's timeouts at the time left and shuts the connection
down if the answer is still arriving when the deadline passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from sona.deadline import SLACK_S, Deadline, in_effect


class DeadlineTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        deadline = in_effect()
        if deadline is None:
            return self._inner.handle_request(request)
        step = f"{request.method} {request.url.path}"
        left = deadline.check(step)
        request.extensions["timeout"] = _capped(request.extensions.get("timeout", {}), left)
        try:
            response = self._inner.handle_request(request)
        except httpx.TransportError as exc:
            raise _spent_or(exc, deadline, step) from None
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        response.stream = _BoundedStream(response.stream, deadline, sock, step)
        return response

    def close(self) -> None:
        self._inner.close()


class _BoundedStream(httpx.SyncByteStream):
    """The answer's body, cut off at the deadline."""

    def __init__(self, inner: Any, deadline: Deadline, sock: Any, step: str) -> None:
        self._inner, self._deadline, self._sock, self._step = inner, deadline, sock, step

    def __iter__(self) -> Iterator[bytes]:
        try:
            with self._deadline.cuts(self._sock):
                yield from self._inner
        except httpx.TransportError as exc:
            raise _spent_or(exc, self._deadline, self._step) from None

    def close(self) -> None:
        self._inner.close()


def _capped(timeouts: dict[str, float | None], left: float) -> dict[str, float]:
    names = ("connect", "read", "write", "pool")
    return {name: min(left, timeouts.get(name) or left) for name in names}


def _spent_or(exc: httpx.TransportError, deadline: Deadline, step: str) -> Exception:
    """The deadline's own kind when it is what ended the call; otherwise the original error."""
    if deadline.remaining() <= SLACK_S:
        return deadline.exceeded(step)
    return exc
