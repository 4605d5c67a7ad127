"""The webhook transport as Supabase runs it: supabase_functions.http_request queues through pg_net,
whose one worker sends batches (the stand-in and the relay in devstack)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from devstack.database import apply_sql
from devstack.emulators.relay import WORKER_NAME, WebhookRelay
from devstack.events import CHANGES, UNWATCHED_POLL_S
from tests.support import sql, wait_until

PROBE = """
create table if not exists public.hook_probe (id int primary key);
drop trigger if exists probe_hook on public.hook_probe;
create trigger probe_hook after insert on public.hook_probe for each row
  execute function supabase_functions.http_request({args});
"""


def probe_trigger(url: str, *args: str) -> str:
    quoted = ", ".join("'" + a.replace("'", "''") + "'" for a in (url, *args))
    return PROBE.format(args=quoted)


def queued(db_url: str) -> list[dict[str, Any]]:
    return sql(
        db_url,
        "select id, method, url, headers, timeout_milliseconds from net.http_request_queue order by id",
        role=None,
    )


# -- supabase_functions.http_request ----------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
DEFAULTS = [
    # trigger arguments after the url -> (method, headers, timeout) queued
    (("POST",), ("POST", JSON, 1000)),
    (("POST", "null", "null", "null"), ("POST", JSON, 1000)),
    (("POST", '{"X-A": "1"}', "{}", "2500"), ("POST", {"X-A": "1", **JSON}, 2500)),
    (("GET", "null", '{"q": "a b"}'), ("GET", JSON, 1000)),
]


@pytest.mark.parametrize(("args", "expected"), DEFAULTS, ids=[",".join(a) for a, _ in DEFAULTS])
def test_http_request_fills_in_supabases_defaults(
    private_db_url: str, args: tuple[str, ...], expected: tuple[str, dict[str, str], int]
) -> None:
    apply_sql(private_db_url, probe_trigger("http://127.0.0.1:9/hook", *args))
    sql(private_db_url, "insert into hook_probe values (1)", role=None)
    (row,) = queued(private_db_url)
    assert (row["method"], row["headers"], row["timeout_milliseconds"]) == expected


def test_http_request_get_sends_the_params_in_the_url_and_no_body(private_db_url: str) -> None:
    apply_sql(private_db_url, probe_trigger("http://127.0.0.1:9/hook", "GET", "null", '{"q": "a b/é"}'))
    sql(private_db_url, "insert into hook_probe values (1)", role=None)
    (row,) = sql(private_db_url, "select url, body from net.http_request_queue", role=None)
    assert (row["url"], row["body"]) == ("http://127.0.0.1:9/hook?q=a%20b%2F%C3%A9", None)


REFUSED = [
    (("PUT",), "method argument PUT is invalid"),
    (("POST", '{"Content-Type": "text/plain"}'), 'Content-Type header must be "application/json"'),
    (("POST", '{"content-type": "application/json; charset=utf-8"}'), "Content-Type header must be"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED, ids=["PUT", "text/plain", "charset"])
def test_http_request_refusal_fails_the_insert(
    private_db_url: str, args: tuple[str, ...], message: str
) -> None:
    apply_sql(private_db_url, probe_trigger("http://127.0.0.1:9/hook", *args))
    with pytest.raises(psycopg.errors.RaiseException, match=message):
        sql(private_db_url, "insert into hook_probe values (1)", role=None)
    assert sql(private_db_url, "select count(*) as n from hook_probe", role=None) == [{"n": 0}]
    assert queued(private_db_url) == []


def test_http_request_writes_a_hooks_row_per_call(private_db_url: str) -> None:
    apply_sql(private_db_url, probe_trigger("http://127.0.0.1:9/hook", "POST"))
    sql(private_db_url, "insert into hook_probe select generate_series(1, 3)", role=None)
    hooks = sql(
        private_db_url,
        "select hook_table_id, hook_name, request_id from supabase_functions.hooks order by id",
        role=None,
    )
    (table_oid,) = sql(private_db_url, "select 'public.hook_probe'::regclass::oid::int as oid", role=None)
    assert [(h["hook_table_id"], h["hook_name"]) for h in hooks] == [(table_oid["oid"], "probe_hook")] * 3
    assert [h["request_id"] for h in hooks] == [q["id"] for q in queued(private_db_url)]


# -- pg_net's worker: the relay -----------------------------------------------------------------------


@dataclass
class Endpoint:
    """A local HTTP endpoint that answers after ?s= seconds and records what it saw."""

    url: str
    seen: list[tuple[str, float, float]] = field(default_factory=list)  # path, arrived, answered
    active: int = 0
    most_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def arrived(self, name: str) -> float:
        return next(a for p, a, _ in self.seen if p == name)

    def answered(self, name: str) -> float:
        return next(e for p, _, e in self.seen if p == name)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    state = Endpoint(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            arrived = time.monotonic()
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with state.lock:
                state.active += 1
                state.most_active = max(state.most_active, state.active)
            CHANGES.notify()
            parts = urlsplit(self.path)
            time.sleep(float(parse_qs(parts.query).get("s", ["0"])[0]))  # the answer's delay under test
            with state.lock:
                state.active -= 1
                state.seen.append((parts.path, arrived, time.monotonic()))
            CHANGES.notify()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')
            except OSError:
                pass  # the client gave up (timed out)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def relay(db_url: str) -> Iterator[WebhookRelay]:
    r = WebhookRelay(db_url, pause_s=0.2)
    r.start()
    yield r
    r.stop()


def post(db_url: str, url: str, *, timeout_ms: int = 10_000, headers: str = "{}") -> int:
    (row,) = sql(
        db_url,
        "select net.http_post(%s, '{}'::jsonb, '{}'::jsonb, %s::jsonb, %s) as id",
        url,
        headers,
        timeout_ms,
        role=None,
    )
    return int(row["id"])


def responses(db_url: str) -> dict[int, dict[str, Any]]:
    rows = sql(db_url, "select * from net._http_response", role=None)
    return {r["id"]: r for r in rows}


def test_a_request_queued_while_a_long_one_is_in_flight_waits_for_it(
    db_url: str, relay: WebhookRelay, endpoint: Endpoint
) -> None:
    post(db_url, f"{endpoint.url}/a?s=2")
    wait_until(lambda: relay.inflight() == 1)
    post(db_url, f"{endpoint.url}/b")
    wait_until(lambda: len(endpoint.seen) == 2, timeout_s=10)
    assert endpoint.arrived("/b") >= endpoint.answered("/a")
    assert [len(batch) for batch in relay.batches] == [1, 1]


def test_a_timed_out_request_is_recorded_and_never_retried(
    db_url: str, relay: WebhookRelay, endpoint: Endpoint
) -> None:
    request_id = post(db_url, f"{endpoint.url}/slow?s=1", timeout_ms=300)
    wait_until(lambda: request_id in responses(db_url), timeout_s=10)
    response = responses(db_url)[request_id]
    assert (response["timed_out"], response["status_code"]) == (True, None)
    assert response["error_msg"].startswith("Timeout of 300 ms reached. Total time: ")
    # The slow answer has come and gone, no request is at the endpoint, and the relay's worker is
    # asleep with its queue empty: it sends nothing more until a new commit wakes it. So a request
    # sent again would be in `seen` (a retry in the same batch had finished its own 1 s first).
    wait_until(lambda: bool(endpoint.seen) and endpoint.active == 0, timeout_s=10)
    wait_until(lambda: relay.asleep() and queued(db_url) == [], timeout_s=10)
    assert [p for p, _, _ in endpoint.seen] == ["/slow"]
    assert len(relay.delivered) == 1


def test_an_answered_request_records_status_headers_and_content(
    db_url: str, relay: WebhookRelay, endpoint: Endpoint
) -> None:
    request_id = post(db_url, f"{endpoint.url}/ok")
    wait_until(lambda: request_id in responses(db_url), timeout_s=10)
    response = responses(db_url)[request_id]
    assert (response["status_code"], response["timed_out"], response["error_msg"]) == (200, False, None)
    assert (response["content_type"], response["content"]) == ("application/json", '{"ok": true}')


UNSENDABLE = [
    ("http://127.0.0.1:9/nothing-listens", "Couldn't connect to server"),
    ("ftp://127.0.0.1/file", "Unsupported protocol"),
    ("http://127.0.0.1:port/", "URL using bad/illegal format or missing URL"),
]


@pytest.mark.parametrize(("url", "message"), UNSENDABLE, ids=["refused", "ftp", "bad port"])
def test_a_request_that_cannot_be_sent_is_recorded_with_curls_message(
    db_url: str, relay: WebhookRelay, url: str, message: str
) -> None:
    request_id = post(db_url, url)
    wait_until(lambda: request_id in responses(db_url), timeout_s=10)
    response = responses(db_url)[request_id]
    assert (response["status_code"], response["timed_out"], response["error_msg"]) == (None, False, message)


def test_a_batch_is_at_most_batch_size_requests_run_together(db_url: str, endpoint: Endpoint) -> None:
    with psycopg.connect(db_url, autocommit=False) as conn:  # one commit: one wake, five queued
        for i in range(5):
            conn.execute(
                "select net.http_post(%s, '{}'::jsonb, '{}'::jsonb, '{}'::jsonb, 10000)",
                (f"{endpoint.url}/r{i}?s=0.3",),
            )
    relay = WebhookRelay(db_url, batch_size=2, pause_s=0.05)
    relay.start()
    try:
        wait_until(lambda: len(responses(db_url)) == 5, timeout_s=15)
    finally:
        relay.stop()
    assert [len(batch) for batch in relay.batches] == [2, 2, 1]
    assert endpoint.most_active == 2
    ends = [max(endpoint.answered(f"/r{i}") for i in batch) for batch in ((0, 1), (2, 3))]
    starts = [min(endpoint.arrived(f"/r{i}") for i in batch) for batch in ((2, 3), (4,))]
    assert all(start >= end for start, end in zip(starts, ends, strict=True))


def test_a_disabled_relay_drops_what_it_takes_and_records_nothing(
    db_url: str, relay: WebhookRelay, endpoint: Endpoint
) -> None:
    relay.enabled = False
    post(db_url, f"{endpoint.url}/lost")
    wait_until(lambda: len(relay.dropped) == 1)
    assert (queued(db_url), responses(db_url), endpoint.seen) == ([], {}, [])


def test_a_relay_turned_off_drops_a_request_queued_after_even_mid_transaction(
    db_url: str, endpoint: Endpoint
) -> None:
    """The switch holds for every request queued after it, even one the worker takes in a
    transaction it began before the switch: here that transaction waits on a lock the test holds on
    the responses table (its first statement deletes expired ones) while the test switches and posts."""
    relay = WebhookRelay(db_url, pause_s=0.2)
    try:
        with psycopg.connect(db_url) as holder:  # the lock is let go on leaving, whatever happened
            holder.execute("lock table net._http_response in access exclusive mode")
            relay.start()  # it looks at the queue once on start: that transaction waits on the lock
            wait_until(lambda: worker_waits_on_a_lock(db_url), poll_s=UNWATCHED_POLL_S)
            relay.enabled = False
            post(db_url, f"{endpoint.url}/late")
        wait_until(lambda: len(relay.dropped) == 1)
    finally:
        relay.stop()
    assert (queued(db_url), responses(db_url), endpoint.seen) == ([], {}, [])


def worker_waits_on_a_lock(db_url: str) -> bool:
    rows = sql(
        db_url,
        "select 1 from pg_stat_activity where application_name = %s and wait_event_type = 'Lock'",
        WORKER_NAME,
        role=None,  # another role's session shows no wait events
    )
    return bool(rows)


PLAIN_ROLE = """
do $$ begin
  if not exists (select from pg_roles where rolname = 'sona_plain_reader') then
    create role sona_plain_reader nologin;
  end if;
end $$;
-- So that a role that is not a superuser (postgres on Supabase) may act as it.
grant sona_plain_reader to current_user;
"""


def test_any_role_can_read_a_queued_requests_secret_header_while_it_is_open(
    db_url: str, relay: WebhookRelay, endpoint: Endpoint
) -> None:
    apply_sql(db_url, PLAIN_ROLE)  # a role nobody granted anything: pg_net granted PUBLIC
    post(db_url, f"{endpoint.url}/open?s=1.5", headers='{"X-Webhook-Secret": "open-secret"}')
    wait_until(lambda: relay.inflight() == 1)
    for role in ("sona_plain_reader", "anon", "authenticated"):
        (row,) = sql(db_url, "select headers from net.http_request_queue", role=role)
        assert row["headers"]["X-Webhook-Secret"] == "open-secret"
    wait_until(lambda: len(responses(db_url)) == 1, timeout_s=10)
    assert queued(db_url) == []  # gone once its batch has ended
    stored = sql(db_url, "select headers::text || coalesce(content, '') as t from net._http_response")
    assert "open-secret" not in stored[0]["t"]  # the response table keeps the answer, not the request
