"""The webhook relay: pg_net's background worker, locally (pg_net 0.20, src/worker.c and src/core.c).

The trigger (supabase_functions_stand_in.sql) queues requests in net.http_request_queue and wakes
the worker at commit. The worker then repeats, while there was work: in one transaction, delete
expired responses, take up to `batch_size` queued requests (oldest first), run them all at once,
write each outcome to net._http_response, commit; then wait up to `pause_s` (a wake cuts the wait
short, but only the first wake since the worker last woke, as pg_net's latch does). So the next
batch starts only when every request of the current one has ended: one long request holds up every
later webhook. The timeout is curl's total time; nothing is ever retried.

Measured against real pg_net 0.20.x (issue 25, pg_net 3): a redirect is followed (a 307 to another
URL delivers there and the final 200 is recorded), and a request carries `Accept: */*` and no
`Accept-Encoding`. How the rest of the redirect follows curl's documented defaults: 307 and 308 keep
the method and body, 301, 302 and 303 turn a POST into a GET without a body, at most 30 redirects,
Authorization and Cookie are not sent on to another host.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urljoin, urlsplit

import psycopg
from pydantic import BaseModel, ConfigDict

from devstack.events import CHANGES

log = logging.getLogger(__name__)

PG_NET_VERSION = "0.20.4"
WAKE_CHANNEL = "pg_net_wake"
DEFAULT_BATCH_SIZE = 200  # pg_net.batch_size
DEFAULT_PAUSE_S = 1.0  # the worker's WaitLatch between batches
DEFAULT_TTL = "6 hours"  # pg_net.ttl: how long responses are kept
WORKER_NAME = "pg_net worker"  # the application_name net.check_worker_is_up() looks for
MAX_REDIRECTS = 30  # curl's CURLOPT_MAXREDIRS default
REDIRECTS = {301, 302, 303, 307, 308}

EXPIRE = """
with rows as (select ctid from net._http_response where created < now() - %s::interval
              order by created limit %s)
delete from net._http_response r using rows where r.ctid = rows.ctid"""

CONSUME = """
with rows as (select id from net.http_request_queue order by id limit %s)
delete from net.http_request_queue q using rows where q.id = rows.id
returning q.id, q.method, q.url, q.headers, q.body, q.timeout_milliseconds"""

RECORD = """
insert into net._http_response (id, status_code, content, headers, content_type, timed_out, error_msg)
values (%s, %s, %s, %s, %s, %s, %s)"""


class QueuedRequest(BaseModel):
    """A row of net.http_request_queue, as the worker takes it."""

    model_config = ConfigDict(frozen=True)

    id: int
    method: str
    url: str
    headers: dict[str, str] | None
    body: bytes | None
    timeout_milliseconds: int

    def json_body(self) -> Any:
        return json.loads(self.body) if self.body else None


class Outcome(BaseModel):
    """What pg_net records in net._http_response for one request."""

    model_config = ConfigDict(frozen=True)

    status_code: int | None = None
    content_type: str | None = None
    headers: dict[str, str] | None = None
    content: str | None = None
    timed_out: bool = False
    error_msg: str | None = None


class Delivery(BaseModel):
    request: QueuedRequest
    outcome: Outcome
    # The relay's own clock (epoch seconds): when it began sending, and when the answer had come.
    sent_at: float = 0.0
    answered_at: float = 0.0


class _Clock:
    """curl's CURLOPT_TIMEOUT_MS: one budget for the whole transfer (0 means none, as in curl)."""

    def __init__(self, timeout_ms: int) -> None:
        self.timeout_ms = timeout_ms
        self.started = time.monotonic()
        self.connected: float | None = None

    def remaining(self) -> float | None:
        if self.timeout_ms <= 0:
            return None
        left = self.started + self.timeout_ms / 1000 - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def timeout_message(self) -> str:
        """pg_net's wording (src/errors.c); the name lookup is counted in the handshake here."""
        total = (time.monotonic() - self.started) * 1000
        handshake = total if self.connected is None else (self.connected - self.started) * 1000
        http = total - handshake
        return (
            f"Timeout of {self.timeout_ms} ms reached. Total time: {total:f} ms (DNS time: 0.000000 ms,"
            f" TCP/SSL handshake time: {handshake:f} ms, HTTP Request/Response time: {http:f} ms)"
        )


class UnsupportedProtocol(ValueError):
    """pg_net lets curl speak only http and https."""


def _curl_error(exc: Exception) -> str:
    """curl_easy_strerror's text for the failure curl would have had."""
    if isinstance(exc, UnsupportedProtocol):
        return "Unsupported protocol"
    if isinstance(exc, (ValueError, http.client.InvalidURL)):
        return "URL using bad/illegal format or missing URL"
    if isinstance(exc, ConnectionRefusedError):
        return "Couldn't connect to server"
    if isinstance(exc, socket.gaierror):
        return "Couldn't resolve host name"
    if isinstance(exc, ssl.SSLError):
        return "SSL connect error"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "Server returned nothing (no headers, no data)"
    return "Failure when receiving data from the peer"


def _connection(url: str, clock: _Clock) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsupportedProtocol(parts.scheme)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname or "localhost", parts.port, timeout=clock.remaining())
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return conn, target


def perform(request: QueuedRequest) -> Outcome:
    """One request as pg_net's curl handle makes it: its headers plus pg_net's User-Agent and curl's
    Accept, the body as queued, redirects followed, every step bounded by what is left of the total
    timeout."""
    clock = _Clock(request.timeout_milliseconds)
    method, url, body = request.method.upper(), request.url, request.body
    headers = dict(request.headers or {})
    if not any(name.lower() == "accept" for name in headers):
        headers = {"Accept": "*/*", **headers}
    headers["User-Agent"] = f"pg_net/{PG_NET_VERSION}"
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, answer_headers, content = _exchange(method, url, headers, body, clock)
            location = next((v for k, v in answer_headers.items() if k.lower() == "location"), None)
            if status not in REDIRECTS or location is None:
                break
            target = urljoin(url, location)
            if _origin(target) != _origin(url):
                headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}
            if status in (301, 302, 303) and method == "POST":
                method, body = "GET", None
            url = target
        else:
            return Outcome(error_msg="Number of redirects hit maximum amount")
    except TimeoutError:
        return Outcome(timed_out=True, error_msg=clock.timeout_message())
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return Outcome(error_msg=_curl_error(exc))
    text = content.decode("utf-8", errors="replace")
    content_type = next((v for k, v in answer_headers.items() if k.lower() == "content-type"), None)
    return Outcome(
        status_code=status, content_type=content_type, headers=answer_headers, content=text or None
    )


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _exchange(
    method: str, url: str, headers: dict[str, str], body: bytes | None, clock: _Clock
) -> tuple[int, dict[str, str], bytes]:
    """One request and its whole answer. curl sends no Accept-Encoding unless asked, so neither
    does this (http.client would add `identity`)."""
    conn, target = _connection(url, clock)
    try:
        conn.connect()
        if clock.connected is None:
            clock.connected = time.monotonic()
        sock = conn.sock  # http.client drops its reference once the answer says close
        assert sock is not None
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        sock.settimeout(clock.remaining())
        response = conn.getresponse()
        chunks = []
        # http.client closes the socket once a body of known length has been read whole.
        while not response.isclosed() and (chunk := response.read(65536)):
            chunks.append(chunk)
            if not response.isclosed():
                sock.settimeout(clock.remaining())
        return response.status, dict(response.getheaders()), b"".join(chunks)
    finally:
        conn.close()


class WebhookRelay:
    def __init__(
        self,
        database_url: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        pause_s: float = DEFAULT_PAUSE_S,
        ttl: str = DEFAULT_TTL,
    ) -> None:
        self.database_url = database_url
        self.batch_size = batch_size
        self.pause_s = pause_s
        self.ttl = ttl
        self.enabled = True  # off: each batch taken is dropped, as an unlogged queue is on a crash
        self.delivered: list[Delivery] = []
        self.dropped: list[QueuedRequest] = []
        self.batches: list[list[int]] = []  # the request ids of each batch run, in order
        self._stop = threading.Event()
        self._latch = threading.Event()
        self._lock = threading.Lock()
        self._should_wake = True  # pg_net starts awake, so what was queued before it is sent
        self._inflight = 0
        self._asleep = False  # the worker waits for a wake (none due): it sends nothing until one
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        listening = threading.Event()
        listener = threading.Thread(target=self._listen, args=(listening,), daemon=True, name="pg-net-listen")
        listener.start()
        listening.wait(10)  # listen first, so no commit's wake is missed once the worker runs
        worker = threading.Thread(target=self._work, daemon=True, name="pg-net-worker")
        worker.start()
        self._threads = [listener, worker]

    def stop(self) -> None:
        self._stop.set()
        self._latch.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def asleep(self) -> bool:
        """The worker is waiting for a wake and none is due: until a commit queues a request, it
        sends nothing more (the proof, with an empty queue, that nothing will be sent again)."""
        with self._lock:
            return self._asleep and not self._should_wake

    def wait_idle(self, timeout_s: float = 120) -> None:
        """Until nothing is queued or in flight (a request in flight is still in the queue, whose
        rows its batch deletes at its commit). Like pg_net, the relay takes a request up to a pause
        after its commit, so a test that turned delivery off waits here before turning it back on.
        Looks again after each batch commits (the relay reports it); raises WaitTimedOut."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            CHANGES.wait_until(
                lambda: (
                    conn.execute("select not exists (select from net.http_request_queue)").fetchone()
                    == (True,)
                ),
                timeout_s,
                "pg_net's queue to be empty (every request taken and its batch committed)",
            )

    def requests_for(self, job_id: object) -> list[QueuedRequest]:
        """What was taken from the queue for a job's row, delivered or dropped (for tests)."""
        with self._lock:
            taken = [d.request for d in self.delivered] + list(self.dropped)
        return [r for r in taken if (r.json_body() or {}).get("record", {}).get("id") == str(job_id)]

    def _worker_connection(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True, application_name=WORKER_NAME)

    # -- waking ----------------------------------------------------------------------------------
    def wake(self) -> None:
        """A commit that queued a request: sets the latch only if the worker is not already due."""
        with self._lock:
            if self._should_wake:
                return
            self._should_wake = True
        self._latch.set()

    def _take_wake(self) -> bool:
        with self._lock:
            due, self._should_wake = self._should_wake, False
        return due

    def _listen(self, listening: threading.Event) -> None:
        while not self._stop.is_set():
            try:
                with self._worker_connection() as conn:
                    conn.execute(f"listen {WAKE_CHANNEL}")  # type: ignore[arg-type]
                    listening.set()
                    self.wake()  # whatever committed while we were not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.25):
                            self.wake()
            except psycopg.Error as exc:
                log.warning("pg_net stand-in: listener reconnecting after %s", type(exc).__name__)
                self._stop.wait(1)

    # -- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                with self._worker_connection() as conn:
                    self._serve(conn)
            except psycopg.Error as exc:
                # pg_net's worker is restarted by the postmaster after 1 s.
                log.warning("pg_net stand-in: worker restarting after %s", type(exc).__name__)
                self._stop.wait(1)

    def _serve(self, conn: psycopg.Connection[Any]) -> None:
        while not self._stop.is_set():
            if not self._take_wake():
                self._set_asleep(True)
                self._latch.wait()
                self._latch.clear()
                continue
            self._set_asleep(False)
            while not self._stop.is_set():
                consumed, expired = self._iteration(conn)
                self._latch.wait(self.pause_s)  # slows the queue down, as pg_net does
                self._latch.clear()
                if consumed == 0 and expired == 0:
                    break

    def _set_asleep(self, asleep: bool) -> None:
        with self._lock:
            self._asleep = asleep
        CHANGES.notify()

    def _iteration(self, conn: psycopg.Connection[Any]) -> tuple[int, int]:
        """One transaction: the queue rows stay visible to others until every request has ended."""
        try:
            return self._one_transaction(conn)
        finally:
            CHANGES.notify()  # committed (or rolled back): the queue and the responses as others see them

    def _one_transaction(self, conn: psycopg.Connection[Any]) -> tuple[int, int]:
        with conn.transaction():
            expired = conn.execute(EXPIRE, (self.ttl, self.batch_size)).rowcount
            rows = conn.execute(CONSUME, (self.batch_size,)).fetchall()
            requests = [_queued(row) for row in rows]
            # Read once the batch is taken: a switch made before a request was queued holds for it,
            # even when this transaction began before the switch (the worker wakes on its own start).
            dropping = not self.enabled
            if requests and not dropping:
                self.batches.append([r.id for r in requests])
                for request, outcome in self._run_batch(requests):
                    _record(conn, request.id, outcome)
        if dropping:
            # Counted once the take has committed: until then the rows are still in the queue for
            # anyone who looks (a test that saw the count first read the queue row still there).
            self.dropped.extend(requests)
        return len(rows), max(expired, 0)

    def _run_batch(self, requests: list[QueuedRequest]) -> Iterator[tuple[QueuedRequest, Outcome]]:
        with self._lock:
            self._inflight += len(requests)
        CHANGES.notify()
        with ThreadPoolExecutor(len(requests), "pg-net-curl") as pool:  # curl's multi handle
            outcomes = list(pool.map(self._deliver, requests))
        return zip(requests, outcomes, strict=True)

    def _deliver(self, request: QueuedRequest) -> Outcome:
        sent_at = time.time()
        outcome = perform(request)
        delivery = Delivery(request=request, outcome=outcome, sent_at=sent_at, answered_at=time.time())
        with self._lock:
            self.delivered.append(delivery)
            self._inflight -= 1
        CHANGES.notify()
        return outcome


def _queued(row: tuple[Any, ...]) -> QueuedRequest:
    id_, method, url, headers, body, timeout_ms = row
    return QueuedRequest(
        id=id_,
        method=method,
        url=url,
        headers=None if headers is None else {k: _text(v) for k, v in headers.items()},
        body=None if body is None else bytes(body),
        timeout_milliseconds=timeout_ms,
    )


def _text(value: Any) -> str:
    """A header value as pg_net sends it: jsonb_each_text's rendering."""
    return value if isinstance(value, str) else json.dumps(value)


def _record(conn: psycopg.Connection[Any], request_id: int, outcome: Outcome) -> None:
    headers = None if outcome.headers is None else json.dumps(outcome.headers)
    conn.execute(
        RECORD,
        (
            request_id,
            outcome.status_code,
            outcome.content,
            headers,
            outcome.content_type,
            outcome.timed_out,
            outcome.error_msg,
        ),
    )
