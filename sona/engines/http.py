"""What every provider client does the same way over HTTP (requests): read an answer no later than the
job's deadline, say who is calling, read Retry-After, and turn an answer that never came into the
project's error kinds. Each provider module keeps only what its own API says."""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import Callable

import requests
from requests.structures import CaseInsensitiveDict
from tenacity import Retrying

from sona import __version__
from sona.config import Settings
from sona.deadline import SLACK_S, Deadline
from sona.errors import DeadlineExceeded, TransientError
from sona.retrying import provider_retrying

USER_AGENT = f"sona-audio-function/{__version__} (python {platform.python_version()})"
CHUNK = 256 * 1024


class ProviderClient:
    """What every provider client holds: the settings, its API's base URL, one HTTP session, and the
    sleep its retries wait with (a test passes one that records instead of waiting)."""

    def __init__(
        self,
        settings: Settings,
        base_url: str,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._base_url = base_url
        self._session = session or requests.Session()
        self._sleep = sleep

    def _retrying(self, what: str, deadline: Deadline) -> Retrying:
        """The provider retry policy (MAX_RETRIES from RETRY_DELAY_MS) for one call, inside the deadline."""
        return provider_retrying(what, self._settings, deadline, self._sleep)


def socket_of(response: requests.Response) -> socket.socket | None:
    """The connection's socket while the body is unread (urllib3 2's HTTPResponse.connection), for
    Deadline.cuts to close at the deadline."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def read_within(response: requests.Response, deadline: Deadline, step: str) -> bytearray:
    """The body in one buffer sized from Content-Length (joining chunks would hold it twice),
    checking the deadline after every chunk."""
    length = int(response.headers.get("content-length") or 0)
    body = bytearray(length) if length else bytearray()
    filled = 0
    for chunk in response.iter_content(CHUNK):
        if length and filled + len(chunk) <= length:
            body[filled : filled + len(chunk)] = chunk
        else:
            body[filled:] = chunk
        filled += len(chunk)
        deadline.check(f"{step}: reading the answer")
    del body[filled:]  # a body that stops short is caught by urllib3 (IncompleteRead) before this
    return body


def retry_after(headers: CaseInsensitiveDict[str]) -> float | None:
    """Retry-After in seconds (the delay form; a date or junk reads as none)."""
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def unanswered(exc: requests.RequestException, deadline: Deadline) -> TransientError:
    """A request that got no answer: past the deadline it ends the attempt, else it is retried."""
    if deadline.remaining() <= SLACK_S:
        return DeadlineExceeded("The audio service did not answer in time", detail=type(exc).__name__)
    if isinstance(exc, requests.Timeout):
        return TransientError("The audio service did not answer in time", detail="timeout")
    return TransientError("Could not reach the audio service", detail=type(exc).__name__)
